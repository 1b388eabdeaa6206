"""A job's folders outside jobs.sqlite: its results and the review pages' thumbnails.

A delete removes the rows first and the folders after, so a service killed in between, or a
thumbnail drawn while its job was being deleted, left a folder that no job owns; the service's
start sweeps those (`sweep_deleted`), and the temporary files of writes a kill cut short
(`sweep_killed_writes`)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipelines.outputs import sweep_temporaries
from service.jobs.store import JobStore

log = logging.getLogger(__name__)


def remove_job_folders(job_id: str, out_dir: Path | None, thumbs_dir: Path) -> None:
    """Only ever folders named by the job (a row's out_dir edited by hand removes nothing else);
    a folder that cannot be removed is logged by its job alone."""
    for what, folder in (("results", out_dir), ("thumbnails", thumbs_dir / job_id)):
        if folder is None or folder.name != job_id:
            continue
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("job %s deleted; its %s folder could not be removed (%s)", job_id, what, type(e).__name__)


def sweep_deleted(store: JobStore, thumbs_dir: Path) -> None:
    """Deleted jobs' results folders, and thumbnails of any job that is not live (a cache:
    a store restored from a backup leaves those of jobs it never had)."""
    for job in store.deleted():
        remove_job_folders(job.id, Path(job.out_dir), thumbs_dir)
    if thumbs_dir.is_dir():
        for folder in thumbs_dir.iterdir():
            if folder.is_dir() and store.get(folder.name) is None:
                remove_job_folders(folder.name, None, thumbs_dir)


def sweep_killed_writes(folders: dict[str, Path], older_than_s: float = 3600.0) -> None:
    """Hidden temporary files (`pipelines.outputs`) that writers killed mid-write left, over an
    hour old, in each folder and below: a backup before an upgrade (the size of jobs.sqlite, one
    more for every kill), a half-copied quarantined photo, a results file. Only a job's start
    swept its own folders, and a job that never started again, or an apply, left them for good
    (an audit). A folder inside one already swept is not walked twice."""
    walked: list[Path] = []
    for what, folder in folders.items():
        if not folder.is_dir() or any(folder.resolve().is_relative_to(w) for w in walked):
            continue
        walked.append(folder.resolve())
        if gone := sweep_temporaries(folder, older_than_s):
            log.info("removed %d temporary files killed writes left in the %s folder", gone, what)
