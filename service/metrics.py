"""Prometheus metrics, one registry per app (tests build several apps in one process).

Chosen so an operator can see batching work: the batch-size histogram is the analogue of
Triton's exec_count vs count and Ray Serve's actual_batch_size.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.jobs.store import ACTIVE, FINAL

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("cervixqc_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("cervixqc_http_request_seconds", "HTTP latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("cervixqc_queue_depth", "Images waiting for the engine", registry=r)
        self.queue_wait = Histogram("cervixqc_queue_wait_seconds", "Time an image waited for its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("cervixqc_batch_size", "Images per engine batch (uploads)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("cervixqc_batch_seconds", "Engine time per upload batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("cervixqc_images", "Images labelled, by label and origin", ["label", "origin"],
                              registry=r)
        self.rejected = Counter("cervixqc_rejected_requests", "Requests refused by the load guards", ["reason"],
                                registry=r)
        self.job_items = Counter("cervixqc_job_items", "Files processed by batch-cleaning jobs", registry=r)
        self.quarantine_failures = Counter("cervixqc_quarantine_copy_failures",
                                           "Flagged files a job could not copy into its quarantine "
                                           "(a name too long, a link loop: the file's fault)", registry=r)

    def count_jobs(self, by_status: Callable[[], dict[str, int]]) -> None:
        """`cervixqc_jobs{status}` and `cervixqc_jobs_active` (queued + running), both from one
        read of the job store at each scrape (prometheus_client's custom collector): the active
        gauge was set only when the runner took a job up and read 1 while four jobs were
        active, and failed jobs were visible only by listing them. A store busy past its
        timeout reads NaN (unknown) rather than failing the scrape."""
        class Jobs(Collector):
            def collect(self) -> Iterator[GaugeMetricFamily]:
                try:
                    counts = {k: float(v) for k, v in by_status().items()}
                except sqlite3.Error:
                    counts = dict.fromkeys((*ACTIVE, *FINAL), float("nan"))
                family = GaugeMetricFamily("cervixqc_jobs", "Jobs in the store by status", labels=["status"])
                for status, n in counts.items():
                    family.add_metric([status], n)
                yield family
                yield GaugeMetricFamily("cervixqc_jobs_active", "Jobs queued or running",
                                        value=sum(counts[k] for k in ACTIVE))

        self.registry.register(Jobs())
