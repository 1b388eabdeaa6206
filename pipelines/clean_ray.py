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

import os
import time
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np

from pipelines.clean import (CleanSummary, check_outputs, file_stamp, finish_run, list_inputs, on_disk, open_run,
                             plan_run, quarantine_results)
from pipelines.engine.qc import QCConfig, QCPipeline, decision_for
from pipelines.engine.qc_result import QCResult

_FIELDS = ("record", "stamp")


class QCActor:
    def __init__(self, weights: str, root: str, config: dict) -> None:
        """`config`: QCConfig's fields as the command gave them (device, runtime and precision
        were dropped here before: a Ray run asked for torch at f32 ran OpenVINO's default)."""
        self.qc = QCPipeline(weights, QCConfig(**config))
        self.root = root

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        keys = [str(k) for k in batch["path"]]
        files = [on_disk(Path(self.root), k) for k in keys]
        stamps = [file_stamp(f) or "" for f in files]  # before the read: a file changed meanwhile is redone next run
        results = self.qc.run(files, names=keys)
        return {"record": [r.model_dump_json(exclude={"timings_ms"}) for r in results], "stamp": stamps}


def clean_ray(weights: Path, src: Path, out_dir: Path, quarantine: Path | None = None, policy: str | None = None,
              batch_size: int = 16, actors: int = 1, address: str | None = None,
              progress: Callable[[int, int], None] | None = None, jpeg_decoder: str = "pil",
              quarantine_findings: Collection[str] = (), pixel_check: bool = True, device: str = "auto",
              runtime: str = "auto", precision: str = "auto", **ray_init: object) -> CleanSummary:
    """`ray_init` goes to `ray.init` when this call starts Ray (e.g. num_cpus on a laptop).

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
    src_root = (src.parent if src.is_file() else src).resolve()
    inputs = list_inputs(src)
    store = open_run(src, out_dir, quarantine, decision_for(Path(weights), policy))
    t0 = time.perf_counter()
    started_here = False
    try:
        done, todo = plan_run(store, inputs, src_root, quarantine)
        if todo:  # a rerun with nothing left to do starts no cluster
            started_here = not ray.is_initialized()
            if started_here:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                         **ray_init)
            gpus = 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0
            # one block per batch: Ray's default cut 33 rows into 18 blocks of one or two
            ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=-(-len(todo) // batch_size))
            ds = ds.map_batches(QCActor, batch_size=batch_size, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus,
                                fn_constructor_kwargs={"weights": str(Path(weights).resolve()), "root": str(src_root),
                                                       "config": {"policy": policy, "jpeg_decoder": jpeg_decoder,
                                                                  "device": device, "runtime": runtime,
                                                                  "precision": precision}})
            finished = len(done)
            for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
                results = [QCResult.model_validate_json(r) for r in batch["record"]]
                if quarantine is not None:
                    quarantine_results(src_root, results, quarantine, quarantine_findings)
                store.add(results, {r.path: str(s) or None for r, s in zip(results, batch["stamp"])})
                finished += len(results)
                if progress:
                    progress(finished, len(inputs))
        summary = finish_run(store, out_dir, src_root if pixel_check else None, inputs, len(todo), len(done), t0)
    finally:
        store.close()
        if started_here:
            ray.shutdown()
    return summary
