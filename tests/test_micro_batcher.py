"""The service's micro-batcher over the real engine: what one request's photos may cost the
other requests batched with them."""

import asyncio

import pytest

from pipelines.engine.config import QCConfig
from pipelines.engine.decode import DecodeLimits
from pipelines.engine.qc import QCPipeline
from pipelines.engine.qc_result import Label
from service.batcher import MicroBatcher
from service.gate import EngineGate
from service.metrics import Metrics
from tests.qc_fixtures import fuzz_set, tiny_weights


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The decode checks off for slivers, so that one readable photo fails in the models (the
    detector's resize), as a photo the checks let through but the models cannot take would."""
    weights = tiny_weights(tmp_path_factory.mktemp("w"), detector_threshold=0.0)
    return QCPipeline(weights, QCConfig(device="cpu", runtime="torch", limits=DecodeLimits(max_aspect=1e9)))


def _batched(engine, requests: list[list[tuple[bytes, str]]], health=None) -> list[list[object]]:
    """Every request queued before the batcher gathers, so that they share one batch."""

    async def main():
        batcher = MicroBatcher(lambda data, names: engine.run(data, names), EngineGate(), Metrics(),
                               max_batch_size=16, max_wait_ms=200, max_queue=64, health=health)
        futures = [batcher.submit(items) for items in requests]
        await batcher.start()
        try:
            return [await asyncio.gather(*fs, return_exceptions=True) for fs in futures]
        finally:
            await batcher.stop()

    return asyncio.run(main())


@pytest.mark.timeout(120)
def test_one_requests_failing_photo_does_not_fail_the_unreadable_photos_of_another(engine):
    """The sliver is the batch's only decodable photo, so the engine cannot tell its fault from
    the system's and raises; the other request's empty file had an answer (unreadable) and
    got a 500 with it. Now only the sliver's own request fails."""
    cases = fuzz_set()
    sliver, empty, ok = cases["sliver.png"][0], cases["zero.jpg"][0], cases["ok.jpg"][0]
    failing, unreadable = _batched(engine, [[(sliver, "sliver.png")], [(empty, "zero.jpg")]])
    assert isinstance(failing[0], RuntimeError)
    assert unreadable[0].label == Label.UNREADABLE and unreadable[0].path == "zero.jpg"
    # every decodable photo fails alone too (as in a fault of the system): the engine raises
    # for the batch, and each request is run again on its own
    both_bad, empty_again = _batched(engine, [[(sliver, "s1.png"), (sliver, "s2.png")], [(empty, "zero.jpg")]])
    assert all(isinstance(r, RuntimeError) for r in both_bad)
    assert empty_again[0].label == Label.UNREADABLE
    # a sliver beside a photo the models take is the engine's own case: a row, not a failure
    row, fine = _batched(engine, [[(sliver, "sliver.png")], [(ok, "ok.jpg")]])
    assert row[0].label == Label.UNREADABLE and "the models failed on this image" in row[0].error
    assert fine[0].label != Label.UNREADABLE


@pytest.mark.timeout(120)
def test_engine_calls_failing_in_a_row_make_the_engine_failing_until_one_succeeds_or_a_probe_does(engine):
    """A persistent engine fault answered 500 to every upload while /readyz said ready, and no
    metric counted it. One request's own failing photo is one failure; the next good call
    resets the run; a probe on the warm-up photo (what /readyz runs) brings it back."""
    from prometheus_client import generate_latest

    from service.engine_health import FAILING_AFTER, WARM_UP, EngineHealth

    metrics = Metrics()
    health = EngineHealth(metrics.engine_errors)
    sliver, ok = fuzz_set()["sliver.png"][0], fuzz_set()["ok.jpg"][0]
    for i in range(FAILING_AFTER):
        assert health.failing() is None
        (failed,) = _batched(engine, [[(sliver, "s.png")]], health)
        assert isinstance(failed[0], RuntimeError)
    assert health.failing() == f"the last {FAILING_AFTER} engine calls failed (RuntimeError)"
    assert f'cervixqc_engine_errors_total{{origin="upload"}} {float(FAILING_AFTER)}' in generate_latest(
        metrics.registry).decode()
    (fine,) = _batched(engine, [[(ok, "ok.jpg")]], health)
    assert fine[0].label != Label.UNREADABLE and health.failing() is None
    for _ in range(FAILING_AFTER):
        _batched(engine, [[(sliver, "s.png")]], health)
    assert health.failing()
    health.probe(lambda: engine.run([WARM_UP]))
    assert health.failing() is None
    # probes are spaced: a failing one right after does not run (readiness is polled each second)
    runs = []
    for _ in range(FAILING_AFTER):
        health.failed("job", RuntimeError())
    health.probe(lambda: runs.append(1))
    assert runs == [] and health.failing()


def test_a_request_that_gave_up_lets_its_bytes_go_before_the_loop_reaches_it(engine):
    """Its room was given back at once, but its bytes stayed in the queue until the loop got
    there, a batch later: clients retrying after timeouts held 0.45 GB past the byte limit."""
    import gc
    import tracemalloc

    async def main() -> tuple[int, int]:
        batcher = MicroBatcher(lambda data, names: engine.run(data, names), EngineGate(), Metrics(),
                               max_batch_size=16, max_wait_ms=200, max_queue=64)
        tracemalloc.start()
        try:
            futures = batcher.submit([(bytes(bytearray(32 << 20)), "big.jpg")])  # not started: it stays queued
            held = tracemalloc.get_traced_memory()[0]
            futures[0].cancel()
            await asyncio.sleep(0)  # the done callbacks run
            gc.collect()
            return held, tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()

    held, after = asyncio.run(main())
    assert held > 32 << 20 and after < 8 << 20, (held, after)


@pytest.mark.timeout(120)
def test_a_full_batch_already_queued_goes_to_the_engine_before_the_event_loop_does_other_work(engine):
    """Each wait for the next queued image yielded to the event loop, which then sent the batch
    before's answers and read new uploads while the engine sat idle: a batch whose images are
    all queued goes to the engine first."""
    import time

    ok = fuzz_set()["ok.jpg"][0]
    order: list[str] = []

    def run(data, names):
        order.append("engine")
        return engine.run(data, names)

    def other_work():  # the answers and uploads of the other clients, on the event loop
        time.sleep(0.3)
        order.append("other work")

    async def main():
        batcher = MicroBatcher(run, EngineGate(), Metrics(), max_batch_size=2, max_wait_ms=1000, max_queue=8)
        futures = batcher.submit([(ok, "a.jpg"), (ok, "b.jpg")])
        await batcher.start()
        asyncio.get_running_loop().call_soon(other_work)
        try:
            return await asyncio.gather(*futures)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert [r.path for r in results] == ["a.jpg", "b.jpg"]
    assert order == ["engine", "other work"]
