"""The review pages' views of recent jobs, kept between requests.

A reviewer walks a job one key press at a time, and each page needs the whole job in the grid's
order. At 10^5 items that cost 1.8-2.4 s per page on 2 cores, most of it reading the summaries,
0.9 s sorting them (`python -m tests.benchmarks.review_grid --items 100000`; 0.11-0.25 s with
the view kept). So the view is built once and reused while the job's counts by label stand
still: items are only ever added, or a row the OS could not read replaced once it is read
(`JobStore.add_items`: its label moves; `set_duplicates` leaves the summaries alone), so the
counts tell a stale view from a current one, and a running job simply rebuilds as batches land. Reviews are not part of a view: they are read per request, as they change with
every decision.

Bounded by items, not jobs: a few large jobs or many small ones. A view holds about 500 bytes
per item with its what-if JSON (50 MB for 10^5 items, measured with tracemalloc), so the
bound keeps at most about 150 MB. Each view is charged VIEW_ITEMS items more for what it
holds besides its items (3.7 KB a view in a soak test of 200 views of 4-item jobs: the bound
counted items alone, so 4-item jobs could keep 75,000 views, and a job without items was
never let go).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from service.jobs.store import JobStore
from service.ui.review_view import JobView, Thresholds

MAX_ITEMS = 300_000
VIEW_ITEMS = 8  # a view's own cost, in items of ~500 B: 3.7 KB measured, rounded up


class JobViews:
    def __init__(self, store: JobStore, max_items: int = MAX_ITEMS):
        self.store = store
        self.max_items = max_items
        self._views: OrderedDict[tuple[str, Thresholds], tuple[tuple[tuple[str, int], ...], JobView]] = OrderedDict()
        self._lock = threading.Lock()  # the pages' routes run in FastAPI's thread pool

    def get(self, job_id: str, t: Thresholds) -> JobView:
        key, counts = (job_id, t), tuple(sorted(self.store.counts(job_id).items()))
        with self._lock:
            kept = self._views.get(key)
            if kept is not None and kept[0] == counts:
                self._views.move_to_end(key)
                return kept[1]
        # built outside the lock: a second job's pages need not wait for this one's sort
        view = JobView.of(self.store.summaries(job_id), t)
        with self._lock:
            self._views[key] = (counts, view)
            self._views.move_to_end(key)
            while len(self._views) > 1 and sum(len(v.items) + VIEW_ITEMS
                                               for _, v in self._views.values()) > self.max_items:
                self._views.popitem(last=False)
        return view
