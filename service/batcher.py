"""An asyncio micro-batcher: images from concurrent requests become one engine batch.

LitServe's contract, kept small: requests put (bytes, name) items on a bounded queue; one
task gathers up to `max_batch_size` items, waiting at most `max_wait_ms` after the first;
the engine runs in a worker thread (never on the event loop); each item's future gets its
own result. Guards: a full queue refuses new work (the route answers 503), room is reserved
before a request's bytes are read (`Reservation`), items whose request gave up (timed out,
client gone) give their room back at once and are dropped before the batch runs, and a batch
that returns the wrong number of results fails its items instead of mislabelling them;
a batch that fails is run again request by request, so that one request's photos fail only
their own request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipelines.engine.qc_result import QCResult
from service.engine_health import EngineHealth
from service.gate import EngineGate
from service.metrics import Metrics

log = logging.getLogger(__name__)
RunBatch = Callable[[Sequence[bytes], Sequence[str]], list[QCResult]]


class QueueFull(Exception):
    """The queue cannot take a request's images; `reason` names the limit (a metrics label)."""

    def __init__(self, reason: str = "overload") -> None:
        super().__init__(reason)
        self.reason = reason


class Reservation:
    """Room in the queue for one request's images, taken before their bytes are read into RAM
    and given back once, item by item: when an item's batch is done, or at once when its
    request gives up (timed out, client gone). Checked and not reserved, 16 concurrent 36 MB
    uploads all passed a 40 MB limit and sat in RAM together; released only when the loop
    reached them, a timed-out request's images kept fresh requests out (503) with nobody waiting."""

    def __init__(self, batcher: MicroBatcher, n: int, n_bytes: int) -> None:
        self.batcher, self.n, self.n_bytes = batcher, n, n_bytes

    def release(self, n: int, n_bytes: int) -> None:
        n, n_bytes = min(n, self.n), min(n_bytes, self.n_bytes)
        self.n, self.n_bytes = self.n - n, self.n_bytes - n_bytes
        self.batcher.pending -= n
        self.batcher.pending_bytes -= n_bytes
        self.batcher.metrics.queue_depth.set(self.batcher.pending)
        self.batcher.metrics.queue_bytes.set(self.batcher.pending_bytes)

    def cancel(self) -> None:
        """All that is left: a request that failed before (or without) submitting."""
        self.release(self.n, self.n_bytes)


@dataclass
class _Item:
    data: bytes
    name: str
    future: asyncio.Future
    reservation: Reservation
    queued_at: float = field(default_factory=time.perf_counter)
    released: bool = False

    def release(self) -> None:
        """Its room back, and its bytes let go: a request that gave up stays in the queue until
        the loop reaches it, a batch later, and its bytes with it, past the room counted free
        (clients retrying after 4 s timeouts: +1.25 GB RSS against +0.8 GB without)."""
        if not self.released:
            self.released = True
            self.reservation.release(1, len(self.data))
            self.data = b""


def _fail_items(items: list[_Item], error: Exception) -> None:
    for it in items:
        if not it.future.done():
            it.future.set_exception(error)


class MicroBatcher:
    def __init__(self, run_batch: RunBatch, gate: EngineGate, metrics: Metrics, max_batch_size: int,
                 max_wait_ms: float, max_queue: int, max_queue_bytes: int = 512 * 1024 * 1024,
                 health: EngineHealth | None = None) -> None:
        self.run_batch, self.gate, self.metrics = run_batch, gate, metrics
        self.health = health or EngineHealth(metrics.engine_errors)
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.max_queue, self.max_queue_bytes = max_queue, max_queue_bytes
        self.pending = 0  # queued + running; read by the job runner's thread (an int read is atomic)
        self.pending_bytes = 0  # their encoded bytes, held in RAM until their batch is done
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._task: asyncio.Task | None = None
        self._batch_seconds = 0.5  # running mean, for Retry-After

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def retry_after_s(self) -> int:
        batches_ahead = self.pending / self.max_batch_size + 1
        return max(1, round(batches_ahead * self._batch_seconds))

    def room_for(self, n: int, n_bytes: int = 0) -> str | None:
        """None when `n` images of `n_bytes` fit the queue, else which limit they pass:
        "overload" (images) or "queue_bytes" (their bytes in RAM)."""
        if self.pending + n > self.max_queue:
            return "overload"
        if self.pending_bytes + n_bytes > self.max_queue_bytes:
            return "queue_bytes"
        return None

    def reserve(self, n: int, n_bytes: int) -> Reservation:
        """Room for a request's `n` images of `n_bytes`, or QueueFull naming the limit. No await
        between the check and the count: two requests cannot both take the last room."""
        full = self.room_for(n, n_bytes)
        if full:
            raise QueueFull(full)
        self.pending += n
        self.pending_bytes += n_bytes
        self.metrics.queue_depth.set(self.pending)
        self.metrics.queue_bytes.set(self.pending_bytes)
        return Reservation(self, n, n_bytes)

    def submit(self, items: Sequence[tuple[bytes, str]], reservation: Reservation | None = None) -> list[asyncio.Future]:
        """Queue a request's images together, into `reservation` (taken here when None); raises
        QueueFull naming the limit. A cancelled future gives its room back at once."""
        n_bytes = sum(len(data) for data, _ in items)
        if reservation is None:
            reservation = self.reserve(len(items), n_bytes)
        elif n_bytes > reservation.n_bytes:  # a part whose size the form did not know
            extra = self.reserve(0, n_bytes - reservation.n_bytes)
            reservation.n_bytes += extra.n_bytes
        loop = asyncio.get_running_loop()
        futures = []
        for data, name in items:
            item = _Item(data, name, loop.create_future(), reservation)
            item.future.add_done_callback(lambda f, it=item: it.release() if f.cancelled() else None)
            self._queue.put_nowait(item)
            futures.append(item.future)
        # what the request reserved beyond its items (a part's declared size over its bytes)
        reservation.release(reservation.n - len(items), reservation.n_bytes - n_bytes)
        return futures

    def _take_queued(self, batch: list[_Item]) -> None:
        while len(batch) < self.max_batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _gather(self) -> list[_Item]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while True:
            # what is queued already joins without a wait: each wait yields to the event loop,
            # which then answered the batch before's requests first while the engine sat idle
            # (the service's engine was busy 0.91-0.93 of the time at 32 clients, its queue never empty)
            self._take_queued(batch)
            remaining = deadline - time.perf_counter()
            if len(batch) >= self.max_batch_size or remaining <= 0:
                return batch
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            live = [it for it in batch if not it.future.done()]  # given-up requests are dropped
            for it in batch:
                if it.future.done():
                    it.release()  # already, when its future was cancelled
            if not live:
                continue
            now = time.perf_counter()
            for it in live:
                self.metrics.queue_wait.observe(now - it.queued_at)
            try:
                try:
                    await self._settle(loop, live)
                except Exception as e:  # noqa: BLE001 - one failed batch must not stop the batcher
                    self.health.failed("upload", e)
                    log.error("engine batch of %d failed (%s)", len(live), type(e).__name__)  # messages may name uploads
                    log.debug("engine batch failed", exc_info=True)
                    await self._settle_by_request(loop, live, e)
            finally:
                for it in live:
                    it.release()

    async def _settle(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        # the bytes taken now, on the loop: a request that gives up while this batch waits for
        # the engine lets its item's bytes go (`_Item.release`), and the batch must still run them
        results = await loop.run_in_executor(self._executor, self._run, [it.data for it in items],
                                             [it.name for it in items])
        if len(results) != len(items):
            raise RuntimeError(f"engine returned {len(results)} results for {len(items)} images")
        self.health.succeeded()
        for it, r in zip(items, results):
            if not it.future.done():
                it.future.set_result(r)

    async def _settle_by_request(self, loop: asyncio.AbstractEventLoop, items: list[_Item], error: Exception) -> None:
        """A failed batch of several requests, run again one request at a time. The engine
        judges a failed batch photo by photo already, but where only one photo of it could
        be decoded it cannot tell that photo's fault from the system's and raises: every
        other client's request then failed with it, though their photos (unreadable ones)
        had answers. A request fails only with its own photos now; a system fault fails
        every request again, one engine call each, on this failure path only."""
        by_request: dict[int, list[_Item]] = {}
        for it in items:
            if not it.future.done():
                by_request.setdefault(id(it.reservation), []).append(it)
        if len(by_request) < 2:
            _fail_items(items, error)
            return
        for group in by_request.values():
            try:
                await self._settle(loop, group)
            except Exception as e:  # noqa: BLE001 - this request's own failure
                self.health.failed("upload", e)
                log.error("a request's %d images failed in the engine (%s)", len(group), type(e).__name__)
                _fail_items(group, e)

    def _run(self, data: list[bytes], names: list[str]) -> list[QCResult]:
        with self.gate.interactive():
            t = time.perf_counter()
            results = self.run_batch(data, names)
            took = time.perf_counter() - t
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * took
        self.metrics.batch_size.observe(len(data))
        self.metrics.batch_seconds.observe(took)
        return results
