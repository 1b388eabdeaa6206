"""What the review page shows of a job: counts, the scores for the what-if histogram, and one
page of the grid, filtered and sorted by closeness to the decision (the images worth a look).

Pure functions over the store's item summaries and the live reviews, so the page, its JSON
twin and the benchmark (`python -m tests.benchmarks.review_grid`) compute the same thing.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

from pipelines.engine.qc import QCPipeline
from pipelines.engine.stage2 import threshold_of
from service.jobs.reviews import Reviewed, class_of
from service.jobs.store import ItemSummary

PAGE_SIZE = 48


@dataclass(frozen=True)
class Thresholds:
    """The decision's thresholds (from the weights' cards) and the job's policy."""

    deep_sad: float
    resnest: float
    detector: float
    presence: float | None
    policy: str
    colour: float | None = None  # the crop-colour scorer's, where the weights carry one

    @classmethod
    def of(cls, qc: QCPipeline, policy: str) -> Thresholds:
        return cls(threshold_of(qc.sad_card), threshold_of(qc.cls_card), qc.det_threshold,
                   qc.presence_threshold if qc.pres_card else None, policy,
                   threshold_of(qc.colour_card) if qc.colour_card else None)

    @property
    def score_name(self) -> str:
        """The stage-2 score the histogram and the score filter use: the policy's own model;
        for `either`/`both`/`two_of_three`, ResNeSt's probability (bounded, so one axis fits
        every job)."""
        return "deep_sad" if self.policy == "deep_sad" else "resnest"

    @property
    def score_threshold(self) -> float:
        return self.deep_sad if self.score_name == "deep_sad" else self.resnest


def stage2_score(s: ItemSummary, t: Thresholds) -> float | None:
    return s.deep_sad_score if t.score_name == "deep_sad" else s.resnest_prob


def margin(s: ItemSummary, t: Thresholds) -> float:
    """How far an item sits from the threshold that decided its label, on comparable scales
    (Deep SAD distances relative to their threshold, probabilities as they are); inf: nothing
    to be close to (unreadable)."""
    if s.label in ("regular", "non_regular") and s.resnest_prob is not None and s.deep_sad_score is not None:
        sad = abs(s.deep_sad_score - t.deep_sad) / max(t.deep_sad, 1e-9)
        prob = abs(s.resnest_prob - t.resnest)
        votes = [sad, prob]
        if s.colour_score is not None and t.colour is not None:
            votes.append(abs(s.colour_score - t.colour))
        return {"deep_sad": sad, "resnest": prob}.get(t.policy, min(votes))
    if s.label == "no_cervix":
        if s.presence_score is not None and t.presence is not None:
            return abs(s.presence_score - t.presence)
        if s.cervix_score is not None:
            return abs(s.cervix_score - t.detector)
    return math.inf


def source_of(path: str) -> str:
    """An item's source: the first folder of its path under the job's folder (sites, clinics or
    cases are usually filed so); files at the top are `(top)`."""
    parts = path.lstrip("/").split("/")  # stored names are POSIX: a `\\xNN` escape is no folder
    return parts[0] if len(parts) > 1 else "(top)"


@dataclass
class GridQuery:
    label: str | None = None  # the model's label
    kind: str | None = None
    source: str | None = None
    score_min: float | None = None
    score_max: float | None = None
    reviewed: bool | None = None
    page: int = 1
    # Next page's start: the first kept item after this one in the view's order. Offsets over a
    # list that decisions change skipped items: under "Reviewed: no", the 48 decided on page 1
    # left it and page 2 began 48 items further on than the first one not shown (an audit).
    after: int | None = None


@dataclass
class Card:
    item: int
    path: str
    label: str
    kind: str | None
    cls: str  # label and kind in one word
    score: float | None
    margin: float
    box: list[float] | None
    width: int | None
    height: int | None
    error: str | None
    review: Reviewed | None


@dataclass
class Grid:
    cards: list[Card]
    matching: int
    page: int
    pages: int
    by_label: dict[str, int] = field(default_factory=dict)
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    reviewed: int = 0
    more: bool = False  # items after the last card


def _keep(s: ItemSummary, q: GridQuery, t: Thresholds, reviews: dict[int, Reviewed]) -> bool:
    if q.label and s.label != q.label or q.kind and s.kind != q.kind:
        return False
    if q.source and source_of(s.path) != q.source:
        return False
    if q.reviewed is not None and (s.item in reviews) != q.reviewed:
        return False
    if q.score_min is not None or q.score_max is not None:
        score = stage2_score(s, t)
        if score is None or (q.score_min is not None and score < q.score_min) or \
                (q.score_max is not None and score > q.score_max):
            return False
    return True


@dataclass(frozen=True)
class JobView:
    """A job's items as every review page reads them: in the grid's order under one set of
    thresholds (closest to the decision first, ties by path), with the counts the page heads
    with. Built once per job and kept (service.ui.job_views): at 10^5 items, reading the
    summaries, sorting them and counting took 2-4 s on every page and every next/previous key."""

    items: list[ItemSummary]
    by_label: dict[str, int]
    by_source: dict[str, dict[str, int]]
    t: Thresholds

    @classmethod
    def of(cls, items: list[ItemSummary], t: Thresholds) -> JobView:
        by_source: dict[str, Counter] = {}
        for s in items:
            by_source.setdefault(source_of(s.path), Counter())[s.label] += 1
        return cls(sorted(items, key=lambda s: (margin(s, t), s.path)), dict(Counter(s.label for s in items)),
                   {src: dict(c) for src, c in sorted(by_source.items())}, t)

    @cached_property
    def what_if_json(self) -> bytes:
        """The what-if histogram's data as the page fetches it, encoded once: at 10^5 items
        encoding the floats took 0.7 s of the request's 1.3 s."""
        return json.dumps({"points": what_if_points(self.items), "policy": self.t.policy,
                           "score": self.t.score_name,
                           "thresholds": {"deep_sad": self.t.deep_sad, "resnest": self.t.resnest,
                                          "colour": self.t.colour}},
                          allow_nan=False, separators=(",", ":")).encode()


def _ordered(view: JobView, reviews: dict[int, Reviewed], t: Thresholds, q: GridQuery) -> list[ItemSummary]:
    """The grid's list: the items the filter keeps, in the view's order."""
    return [s for s in view.items if _keep(s, q, t, reviews)]


def build_grid(view: JobView, reviews: dict[int, Reviewed], t: Thresholds, q: GridQuery,
               page_size: int = PAGE_SIZE) -> Grid:
    chosen = _ordered(view, reviews, t, q)
    pages = max(1, math.ceil(len(chosen) / page_size))
    start = (min(max(1, q.page), pages) - 1) * page_size
    order = {s.item: i for i, s in enumerate(view.items)} if q.after is not None else {}
    if q.after in order:
        start = next((i for i, s in enumerate(chosen) if order[s.item] > order[q.after]), len(chosen))
        if start >= len(chosen):  # nothing after it: the last page
            start = (pages - 1) * page_size
    cards = [Card(s.item, s.path, s.label, s.kind, class_of(s.label, s.kind), stage2_score(s, t), margin(s, t),
                  s.cervix_box, s.width, s.height, s.error, reviews.get(s.item))
             for s in chosen[start : start + page_size]]
    return Grid(cards, len(chosen), min(start // page_size + 1, pages), pages, view.by_label, view.by_source,
                sum(1 for s in view.items if s.item in reviews), start + page_size < len(chosen))


def neighbours(view: JobView, reviews: dict[int, Reviewed], t: Thresholds, q: GridQuery,
               item: int) -> tuple[int | None, int | None]:
    """The previous and next item in the grid's order under the same filter (the image page's
    next/previous keys walk the list the reviewer came from)."""
    ids = [s.item for s in _ordered(view, reviews, t, q)]
    if item in ids:
        i = ids.index(item)
        return (ids[i - 1] if i > 0 else None), (ids[i + 1] if i + 1 < len(ids) else None)
    # the item left the filter (decided, under "Reviewed: no"): its neighbours where it stood,
    # not the top of the list (Next went back to the first item and Previous was gone: an audit)
    order, kept = [s.item for s in view.items], set(ids)
    if item not in order:
        return None, (ids[0] if ids else None)
    at = order.index(item)
    return (next((i for i in reversed(order[:at]) if i in kept), None),
            next((i for i in order[at + 1 :] if i in kept), None))


def what_if_points(items: list[ItemSummary]) -> list[list[float | None]]:
    """[deep_sad, resnest, colour (None without that model)] for every item stage 2 labelled:
    enough for the page to recount labels exactly under a moved threshold and the job's
    policy, in the browser."""
    return [[s.deep_sad_score, s.resnest_prob, s.colour_score] for s in items
            if s.label in ("regular", "non_regular") and s.deep_sad_score is not None and s.resnest_prob is not None]
