"""`cervixqc clean --engine ray`: the same job on Ray Data, for collections past one machine.

The rows' paths -> map_batches over an actor pool whose actors each hold a QCPipeline
(one GPU per actor where the cluster has GPUs) -> rows streamed back into the same SQLite
state store the local engine uses, so outputs, resume and quarantine are identical.
Ray Data fails a whole job on an exception in a task, so nothing outside the actor reads a
file: the actor's engine reads and decodes, and turns every bad file (a dangling link, a
FIFO, a truncated photo) into an `unreadable` row. (`read_binary_files` read the files in
Ray's own tasks: one dangling link failed the job on every retry, and the paths it gave back
were rebuilt relative to the root, so an absolute manifest path got another row key than the
local engine's, and was processed again on every run.)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np

from pipelines.clean.inputs import list_inputs
from pipelines.clean.notes import NoteWatch
from pipelines.clean.quarantine import check_quarantine_names
from pipelines.clean.run import (CleanSummary, check_outputs, done_labels, finish_run, open_run, plan_run,
                                 quarantine_done_rows, store_batch)
from pipelines.clean.state import file_stamp
from pipelines.data.manifest import Spellings
from pipelines.data.schema import on_disk
from pipelines.engine.config import QCConfig
from pipelines.engine.qc import QCPipeline
from pipelines.engine.qc_result import Label, QCResult
from pipelines.engine.weights_folder import decision_for

log = logging.getLogger(__name__)
CRASHED = "the engine's process died on this file (it crashes the decoder or the models, or memory ran out)"
ACTOR_RETRIES = 2


class RayStartError(RuntimeError):
    """Ray could not start or reach its cluster: said as such (an OSError from `ray.init`, an
    unwritable temp folder, was reported as the results folder's)."""


class EngineFailed(RuntimeError):
    """The engine raised for a whole batch in an actor (it does so only where it cannot tell
    a photo's fault from the system's: every photo of the batch failed in the models), or the
    actors died on most blocks. Failed, as the local engine fails, not stored as rows:
    before, Ray skipped the block and its photos became `unreadable` for good."""


# more files than this (and a tenth of the run, and a block) coming back from no actor is the system's fault
# (memory too small for the models, a driver gone), not a few files' that crash a decoder
MAX_CRASHED = 64


def actors_failed(missing: int, todo: int, per_block: int) -> bool:
    """Whether the files that came back from no actor are the actors' failure (memory too small
    for the models) rather than a few files that kill an actor, which one file per block then
    finds. One such file loses its whole block: with a limit below a block (600 files in
    blocks of 75, limit 64) one crasher read as "the actors died on most blocks", exit 1, and
    the one-by-one search never ran (an audit)."""
    return missing > max(MAX_CRASHED, todo // 10, per_block)


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """A host:port (plain, or a Ray Client's `ray://host:port`) is tried first: an unreachable
    cluster had `ray.init` retry for minutes without a word."""
    import socket

    scheme, _, rest = address.rpartition("://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or scheme not in ("", "ray"):
        return  # "auto", another scheme: Ray's own resolution
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayStartError(f"--address {address}: no Ray cluster answers there ({e.strerror or type(e).__name__})"
                            ) from None


class QCActor:
    def __init__(self, weights: str, root: str, config: dict, threads: int | None = None) -> None:
        """`config`: QCConfig's fields as the command gave them (device, runtime and precision
        were dropped here before: a Ray run asked for torch at f32 ran OpenVINO's default)."""
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        self.qc = QCPipeline(weights, QCConfig(**config))
        self.root = root

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        keys = [str(k) for k in batch["path"]]
        files = [on_disk(Path(self.root), k) for k in keys]
        stamps = [file_stamp(f) or "" for f in files]  # before the read: a file changed meanwhile is redone next run
        try:
            results = self.qc.run(files, names=keys)
        except Exception as e:  # noqa: BLE001 - said to the driver, which fails the run (EngineFailed)
            return {"record": [""] * len(keys), "stamp": stamps, "fatal": [type(e).__name__] * len(keys)}
        return {"record": [r.model_dump_json(exclude={"timings_ms"}) for r in results], "stamp": stamps,
                "fatal": [""] * len(keys)}


def clean_ray(weights: Path, src: Path, out_dir: Path, quarantine: Path | None = None, policy: str | None = None,
              batch_size: int = 16, actors: int = 1, address: str | None = None,
              progress: Callable[[int, int], None] | None = None, jpeg_decoder: str = "auto",
              quarantine_findings: Collection[str] = (), pixel_check: bool = True, device: str = "auto",
              runtime: str = "auto", precision: str = "auto", inputs: list[str] | None = None,
              decision: dict | None = None, on_note: Callable[[str], None] | None = None,
              **ray_init: object) -> CleanSummary:
    """`ray_init` goes to `ray.init` when this call starts Ray (e.g. num_cpus on a laptop);
    `inputs` is `list_inputs(src)` and `decision` is `decision_for(weights, policy)` where the
    caller has them already (a 10^6-file share listed once, the weights hashed once);
    `on_note` hears a note as soon as it holds for the rows so far (`NoteWatch`).

    Each actor runs torch (and OpenVINO, which follows it) on the driver's thread count
    (`cervixqc --threads`, else one per core) shared among the local actors: Ray sets
    OMP_NUM_THREADS=1 in its workers, so an actor ran one thread on any machine and its
    scores differed from the local engine's in the fourth decimal.

    A file that kills the actor's process (a decoder's segfault, memory run out) made Ray
    restart the actor and retry its block for good: the run never ended. Blocks are retried
    twice now; the files of a block that still failed are run again one file per block, and
    those that fail alone get an `unreadable` row saying so (`CRASHED`), so the run ends and
    its rerun does not try them again.

    Ray >= 2.45 sees a driver started by `uv run` (as `make test` and `uv run cervixqc` do)
    and starts every worker through `uv run` in a packaged copy of the working directory:
    a fresh environment per worker, which on a 2-core CI machine never finished and hung the
    job. Workers must use the environment the driver already has, so the hook is off unless
    the caller set RAY_ENABLE_UV_RUN_RUNTIME_ENV themselves. Ray reads that variable once, at
    import, and ray may be imported before this call, so the module constant is set too.
    """
    import ray
    from ray._private import ray_constants

    if os.environ.get("RAY_ENABLE_UV_RUN_RUNTIME_ENV") is None:
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False

    if batch_size < 1 or actors < 1:
        raise ValueError(f"batch_size and actors must be at least 1, not {batch_size} and {actors}")
    check_outputs(src, out_dir, quarantine)
    if address is not None and not ray.is_initialized():
        _reachable(address)  # before the run's state: an unreachable cluster left -o tied to the source
    src_root = (src.parent if src.is_file() else src).resolve()
    spellings = Spellings(src_root) if src.is_file() else None
    inputs = list_inputs(src) if inputs is None else inputs
    if quarantine is not None:
        check_quarantine_names(inputs)
    store = open_run(src, out_dir, quarantine, decision or decision_for(Path(weights), policy))
    t0 = time.perf_counter()
    started_here = False
    try:
        done, todo, stale = plan_run(store, inputs, src_root)
        copies_in = quarantine_done_rows(store, src_root, quarantine, quarantine_findings, done)
        if progress:  # where the run starts (a resume: the rows already done)
            progress(len(done), len(inputs))
        notes = NoteWatch(on_note, done_labels(store, done))  # read only when heard
        if todo:  # a rerun with nothing left to do starts no cluster
            started_here = not ray.is_initialized()
            if started_here:
                try:
                    stop = signal.getsignal(signal.SIGTERM)
                    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                             **ray_init)
                    if callable(stop) and threading.current_thread() is threading.main_thread():
                        # Ray's core worker puts its own SIGTERM handler over the command's (a stack
                        # dump, exit 134, no word of resuming: an audit); the command's again, so a
                        # stop ends the run as Ctrl-C does and ray.shutdown below still runs
                        signal.signal(signal.SIGTERM, stop)
                except (OSError, ConnectionError, RuntimeError, ValueError) as e:  # ValueError: a ray:// without
                    # Ray Client's packages (`ray[client]`, in the `ray` extra since an audit found the README's
                    # own example ending in a traceback)
                    started_here = False
                    raise RayStartError(f"Ray could not start ({type(e).__name__}: {e})") from None
            gpus = 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0
            import torch

            actor_kwargs = {"weights": str(Path(weights).resolve()), "root": str(src_root),
                            "threads": max(1, torch.get_num_threads() // (actors if address is None else 1)),
                            "config": {"policy": policy, "jpeg_decoder": jpeg_decoder, "device": device,
                                       "runtime": runtime, "precision": precision}}
            finished = len(done)

            def store_batches(paths: list[str], rows_per_block: int, rows_per_batch: int) -> set[str]:
                try:
                    return store_labelled(paths, rows_per_block, rows_per_batch)
                except ray.exceptions.RayError as e:
                    # the actors could not start their engine (a node without the weights or the GPU
                    # asked for, memory too small for the models): a 240-line traceback, no error
                    # line, no word of resuming (an audit)
                    raise EngineFailed(f"the Ray actors failed ({_ray_reason(e)}); the rows stored so far are kept: "
                                       "fix it and run the same command again to resume") from None

            def store_labelled(paths: list[str], rows_per_block: int, rows_per_batch: int) -> set[str]:
                nonlocal finished
                came_back: set[str] = set()
                for batch in _labelled(ray, paths, rows_per_block, rows_per_batch, actors, gpus, actor_kwargs):
                    fatal = sorted({str(f) for f in batch["fatal"] if f})
                    if fatal:
                        raise EngineFailed(f"the engine failed on a whole batch ({', '.join(fatal)}): not a photo's "
                                           "fault but the system's; the rows stored so far are kept: fix it and run "
                                           "the same command again to resume")
                    results = [QCResult.model_validate_json(r) for r in batch["record"]]
                    store_batch(store, src_root, quarantine, quarantine_findings, stale, results,
                                {r.path: str(s) or None for r, s in zip(results, batch["stamp"])}, copies_in,
                                spellings)
                    notes.add(r.label.value for r in results)
                    came_back.update(r.path for r in results)
                    finished += len(results)
                    if progress:
                        progress(finished, len(inputs))
                return came_back

            # blocks of up to 512 rows (a block per batch made 62,500 of them for 10^6 files, minutes
            # of Ray's own work), at least eight per actor: with two, a run of 240 files stored
            # nothing until both came back together, and a kill lost all of it (an audit); the
            # actors still get batches of batch_size
            per_block = max(batch_size, min(512, -(-len(todo) // (8 * actors))))
            missing = sorted(set(todo) - store_batches(todo, per_block, batch_size))
            if actors_failed(len(missing), len(todo), per_block):
                raise EngineFailed(f"{len(missing)} of {len(todo)} files came back from no actor: the actors died on "
                                   "most blocks (memory too small for the models?); the rows stored so far are "
                                   "kept: fix it and run the same command again to resume")
            if missing:  # their block's actor died on every try: one file per block finds the one at fault
                log.warning("%d files came back from no actor (one died on their block): run again one by one",
                            len(missing))
                crashed = sorted(set(missing) - store_batches(missing, 1, 1))  # Ray bundles blocks up to a batch
                if crashed:
                    log.warning("%d files crashed the engine's process on their own: unreadable rows", len(crashed))
                    rows = [QCResult(path=p, label=Label.UNREADABLE, error=CRASHED) for p in crashed]
                    # quarantined with the other unreadable files; stamped now: the file replaced
                    # later is labelled again (it was never read whole)
                    store_batch(store, src_root, quarantine, quarantine_findings, stale, rows,
                                {p: file_stamp(on_disk(src_root, p)) for p in crashed}, copies_in)
                    notes.add(r.label.value for r in rows)
                    finished += len(crashed)
                    if progress:
                        progress(finished, len(inputs))
        summary = finish_run(store, out_dir, src_root if pixel_check else None, inputs, len(todo), len(done), t0)
    finally:
        store.close()
        if started_here:
            ray.shutdown()
    return summary


def _ray_reason(e: Exception) -> str:
    """The error at the end of a Ray exception's text (the actor's own exception, after
    Ray's traceback of it), without the terminal colours Ray writes into it."""
    import re

    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _labelled(ray, paths: list[str], rows_per_block: int, batch_size: int, actors: int, gpus: int,
              actor_kwargs: dict):
    """The records of `paths`, batch by batch, from an actor pool; a block whose actor died
    on ACTOR_RETRIES + 1 tries is left out (its paths do not come back) instead of failing
    the whole run or being retried for ever (Ray's default for actors)."""
    context = ray.data.DataContext.get_current()
    errored_before, bars_before = context.max_errored_blocks, context.enable_progress_bars
    context.max_errored_blocks = -(-len(paths) // rows_per_block)
    context.enable_progress_bars = False  # Ray's own bars, every 10 s beside the command's
    # one file at a time: the other calls in flight on an actor that dies fail with it, so a
    # photo beside the one at fault was taken for a crasher too
    pool = ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1 if rows_per_block == 1 else None)
    try:
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=-(-len(paths) // rows_per_block))
        with warnings.catch_warnings():  # ray_remote_args: deprecated, with no named parameter for these yet
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")  # (pyproject pins ray)
            ds = ds.map_batches(QCActor, batch_size=batch_size, batch_format="numpy", compute=pool, num_gpus=gpus,
                                max_restarts=-1, max_task_retries=ACTOR_RETRIES, fn_constructor_kwargs=actor_kwargs)
        yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy")
    finally:
        context.max_errored_blocks, context.enable_progress_bars = errored_before, bars_before
