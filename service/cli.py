"""The `cervixqc` console command: every pipelines command, plus `serve`.

`serve` lives here, not in pipelines/commands/, because starting the HTTP service needs the
service package and imports point one way (service -> pipelines -> models): the pipelines
package never imports the service, so its commands stay usable without the web stack.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.cli import app, main
from pipelines.commands.common import _fail, weights_missing, writable_folder


def serve(
    host: Annotated[Optional[str], typer.Option(help="Default: CERVIXQC_HOST or 127.0.0.1.")] = None,
    port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Default: CERVIXQC_PORT or 8000.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Default: CERVIXQC_WEIGHTS_DIR or weights/.")] = None,
) -> None:
    """Start the HTTP service (settings from CERVIXQC_* variables; see README)."""
    import uvicorn
    from pydantic import ValidationError

    from service.settings import Settings

    # the message names where the folder came from: "make weights trains them" sent a site
    # whose CERVIXQC_WEIGHTS_DIR was misspelt off to retrain everything (an audit)
    named = "--weights" if weights is not None else "CERVIXQC_WEIGHTS_DIR" if "CERVIXQC_WEIGHTS_DIR" in os.environ \
        else "the default weights folder"
    if weights is not None:
        os.environ["CERVIXQC_WEIGHTS_DIR"] = str(weights)
    if problem := weights_missing(Path(os.environ.get("CERVIXQC_WEIGHTS_DIR", "weights"))):
        _fail(f"{named}: {problem} (the bundled weights are the weights/ folder of the cervixqc checkout or image)")
    try:  # refuse bad settings here, with a readable message, before uvicorn starts
        settings = Settings()
    except ValidationError as e:
        _fail("; ".join(_named(err) for err in e.errors()))
    host, port = host or settings.host, port or settings.port
    from service.state_lock import let_go

    problem = _preflight(settings) or _bindable(host, port)
    if problem:
        let_go(settings.state_dir)  # taken by the preflight for this start (`state_lock.take`)
        _fail(problem)
    # The app by name, so uvicorn builds it; settings are read again there from the same environment.
    # Open connections get GRACE_S to finish on SIGTERM: a client trickling an upload kept the
    # process up past compose's stop_grace_period, and Docker's SIGKILL followed.
    from service.connections import header_deadline_protocol, raise_open_files_limit
    from service.log_config import uvicorn_config

    raise_open_files_limit()
    uvicorn.run("service.app:create_app", factory=True, host=host, port=port, workers=1,
                log_config=uvicorn_config(settings.log_level), log_level=settings.log_level,
                timeout_graceful_shutdown=GRACE_S, http=header_deadline_protocol(settings.header_timeout_s))


GRACE_S = 8  # + the job runner's stop (JobRunner.stop) stays inside docker-compose.yml's stop_grace_period


def _bindable(host: str, port: int) -> str | None:
    """The address, tried before the models load: a port in use failed only after them, with
    uvicorn's "[Errno 98]" naming no setting, and the job runner had already taken up a job."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"CERVIXQC_HOST (or --host) {host!r}: not an address this machine has ({e.strerror})"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as e:
            return f"CERVIXQC_PORT (or --port) {port} on {host}: cannot listen there ({e.strerror})"
    return None


def _named(err: dict) -> str:
    """A settings error with the variable it came from ("Input should be greater than or
    equal to 1" alone did not say which of a dozen sizes)."""
    msg = err["msg"].removeprefix("Value error, ")
    return f"CERVIXQC_{str(err['loc'][0]).upper()}: {msg}" if err.get("loc") else msg


def _preflight(settings) -> str | None:
    """What the service needs from the machine, checked before uvicorn starts and the models
    load: each used to end in a traceback and "Application startup failed" (a state folder
    that is a file, a damaged weights card, a CUDA device on a machine without one), or in a
    service that reported ready and then failed every job (a data root or quarantine that is
    no folder)."""
    from models.io import WeightsIntegrityError
    from pipelines.engine.config import resolve_device
    from pipelines.engine.weights_folder import check_weights
    from service.jobs.store import store_problem
    from service.settings import findings_card_missing
    from service.state_lock import take
    from service.ui.session import load_secret

    try:  # every card the engine reads, the exports where OpenVINO will run them (on the CPU only)
        check_weights(settings.weights_dir, exports=settings.runtime == "openvino" or (
            settings.runtime == "auto" and settings.resolved_device == "cpu"))
    except WeightsIntegrityError as e:
        return str(e)
    if problem := findings_card_missing(settings):
        return problem
    try:
        writable_folder("CERVIXQC_STATE_DIR", settings.state_dir)
        # the jobs' results: a separate mount in docker-compose.yml, and an unwritable one
        # failed every job after its whole engine pass
        writable_folder("CERVIXQC_STATE_DIR (its jobs/ folder, the jobs' results)", settings.state_dir / "jobs")
    except ValueError as e:
        return str(e)
    busy = take(settings.state_dir) or store_problem(settings.state_dir / "jobs.sqlite")
    if busy:
        return busy
    try:
        load_secret(settings.session_secret_file)
    except (OSError, ValueError) as e:
        return f"CERVIXQC_SESSION_SECRET_FILE: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
    for root in settings.data_roots:
        if not root.is_dir():
            return f"CERVIXQC_DATA_ROOTS: {root} is not a folder"
    if settings.quarantine_root.exists() and not settings.quarantine_root.is_dir():
        return f"CERVIXQC_QUARANTINE_ROOT: {settings.quarantine_root} is not a folder"
    try:  # a quarantine that takes no copy let jobs end `done` with their flagged photos left in place
        writable_folder("CERVIXQC_QUARANTINE_ROOT", settings.quarantine_root)
    except ValueError as e:
        return str(e)
    try:
        resolve_device(settings.device)
    except ValueError as e:
        return f"CERVIXQC_DEVICE: {e}"
    return None


app.command("serve")(serve)  # registered on import, so pipelines.cli.main (the entry point) runs it
__all__ = ["app", "main", "serve"]


if __name__ == "__main__":  # pragma: no cover
    main()
