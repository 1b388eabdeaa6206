"""Prometheus metrics, one registry per app (tests build several apps in one process).

Chosen so an operator can see batching work: the batch-size histogram is the analogue of
Triton's exec_count vs count and Ray Serve's actual_batch_size. The registry also carries the
process's own series (memory, CPU, open files, start time: the memory target is 1.2 GB),
what the service runs (`cervixqc_build_info`: version, models, runtime, device) and the free
space of the folders it writes, since a full disk fails jobs while /readyz can still answer.
Labelled counters start at 0 for every label known in advance, so `rate()` alerts have a
series before the first event; the `_created` series are left out (they doubled the page).
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Counter, Gauge,
                               Histogram, Info, disable_created_metrics)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.jobs.store import ACTIVE, FINAL

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# around the batcher's wait (CERVIXQC_MAX_WAIT_MS, 80 ms by default): every wait fell in one bucket
WAIT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
REJECT_REASONS = ("overload", "queue_bytes", "timeout", "client_closed", "body_too_large", "upload_timeout",
                  "no_space")
ENGINE_ORIGINS = ("upload", "job", "probe")

disable_created_metrics()  # process-wide in prometheus_client; no series of ours is read by its _created


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # stateless: shared by every registry
            r.register(collector)
        self.requests = Counter("cervixqc_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("cervixqc_http_request_seconds", "HTTP latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("cervixqc_queue_depth", "Uploaded images waiting for or in an engine batch",
                                 registry=r)
        self.queue_bytes = Gauge("cervixqc_queue_bytes", "Bytes of the uploaded images waiting for or in an engine "
                                 "batch (CERVIXQC_MAX_QUEUE_BYTES)", registry=r)
        self.queue_wait = Histogram("cervixqc_queue_wait_seconds", "Time an image waited for its batch",
                                    buckets=WAIT_BUCKETS, registry=r)
        self.batch_size = Histogram("cervixqc_batch_size", "Images per engine batch (uploads)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("cervixqc_batch_seconds", "Engine time per upload batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.engine_errors = Counter("cervixqc_engine_errors", "Engine calls that failed, by origin (upload, job, "
                                     "the readiness probe)", ["origin"], registry=r)
        self.build = Info("cervixqc_build", "Version, models (sha256 prefixes), policy, runtime and device",
                          registry=r)
        self.images = Counter("cervixqc_images", "Images labelled, by label and origin", ["label", "origin"],
                              registry=r)
        self.rejected = Counter("cervixqc_rejected_requests", "Requests refused by the load guards", ["reason"],
                                registry=r)
        self.job_items = Counter("cervixqc_job_items", "Files processed by batch-cleaning jobs", registry=r)
        self.quarantine_failures = Counter("cervixqc_quarantine_copy_failures",
                                           "Flagged files a job could not copy into its quarantine "
                                           "(a name too long, a link loop: the file's fault)", registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for origin in ENGINE_ORIGINS:
            self.engine_errors.labels(origin)

    def watch_disks(self, folders: dict[str, Path]) -> None:
        """`cervixqc_disk_free_bytes{folder}` for each named folder (state, results,
        quarantine), read at each scrape; a folder that cannot be read (a share away) reads NaN."""
        class Disks(Collector):
            def collect(self) -> Iterator[GaugeMetricFamily]:
                family = GaugeMetricFamily("cervixqc_disk_free_bytes", "Free bytes where the service writes",
                                           labels=["folder"])
                for name, folder in folders.items():
                    try:  # a folder not made yet (no job has written results): where it will be
                        free = float(shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free)
                    except (OSError, StopIteration):
                        free = float("nan")
                    family.add_metric([name], free)
                yield family

        self.registry.register(Disks())

    def describe_build(self, version: str, decision: dict, runtimes: dict[str, str], device: str) -> None:
        models = decision.get("models", {})
        self.build.info({"version": version, "policy": str(decision.get("policy")), "device": device,
                         **{f"model_{name}": sha[:12] for name, sha in sorted(models.items())},
                         **{f"runtime_{name}": str(rt) for name, rt in sorted(runtimes.items())}})

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
