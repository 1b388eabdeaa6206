"""Uploads before jobs: a job batch never takes the engine while an upload waits for it."""

import threading
import time

from service.gate import EngineGate


def test_a_job_batch_waits_while_uploads_are_queued():
    queued = [3]
    gate = EngineGate(lambda: queued[0])
    entered = threading.Event()

    def job_batch():
        with gate.background(poll_s=0.01):
            entered.set()

    threading.Thread(target=job_batch, daemon=True).start()
    assert not entered.wait(0.3), "a job batch ran while uploads were queued"
    queued[0] = 0
    assert entered.wait(5)


def test_a_waiting_upload_goes_before_a_waiting_job_batch():
    gate = EngineGate()
    order: list[str] = []
    first_running, release_first = threading.Event(), threading.Event()

    def first_upload():
        with gate.interactive():
            first_running.set()
            release_first.wait(5)
            order.append("upload 1")

    def job_batch():
        with gate.background(poll_s=0.01):
            order.append("job")

    def second_upload():
        with gate.interactive():
            order.append("upload 2")

    threads = [threading.Thread(target=first_upload)]
    threads[0].start()
    assert first_running.wait(5)
    threads.append(threading.Thread(target=job_batch))
    threads[1].start()
    time.sleep(0.1)  # the job batch is now waiting for the engine
    threads.append(threading.Thread(target=second_upload))
    threads[2].start()
    time.sleep(0.1)  # and so is the second upload
    release_first.set()
    for t in threads:
        t.join(5)
    assert order == ["upload 1", "upload 2", "job"]
