"""Batch cleaning of a retrospective collection (`cervixqc clean`, the service's jobs, Ray):
the source's files (`inputs`), the results folder's resumable state (`state`), the
quarantine (`quarantine`), the exports (`exports`), the notes on a run's counts (`notes`),
and the run that ties them together, locally (`run`) or on Ray (`ray_run`)."""
