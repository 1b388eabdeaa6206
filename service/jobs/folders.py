"""A job's folders outside jobs.sqlite: its results and the review pages' thumbnails.

A delete removes the rows first and the folders after, so a service killed in between, or a
thumbnail drawn while its job was being deleted, left a folder that no job owns; the service's
start sweeps those (`sweep_deleted`)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

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
