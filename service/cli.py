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
from pipelines.commands.common import _fail


def serve(
    host: Annotated[Optional[str], typer.Option(help="Default: CERVIXQC_HOST or 127.0.0.1.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Default: CERVIXQC_PORT or 8000.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Default: CERVIXQC_WEIGHTS_DIR or weights/.")] = None,
) -> None:
    """Start the HTTP service (settings from CERVIXQC_* variables; see README)."""
    import uvicorn
    from pydantic import ValidationError

    from service.settings import Settings

    if weights is not None:
        os.environ["CERVIXQC_WEIGHTS_DIR"] = str(weights)
    weights_dir = Path(os.environ.get("CERVIXQC_WEIGHTS_DIR", "weights"))
    if not (weights_dir / "detector.json").is_file():
        _fail(f"no weights in {weights_dir}: expected detector.json, deep_sad.json and classifier.json "
              "(make weights trains them)")
    try:  # refuse bad settings here, with a readable message, before uvicorn starts
        settings = Settings()
    except ValidationError as e:
        _fail("; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors()))
    # The app by name, so uvicorn builds it; settings are read again there from the same environment.
    uvicorn.run("service.app:create_app", factory=True, host=host or settings.host, port=port or settings.port,
                workers=1, log_level="info")


app.command("serve")(serve)  # registered on import, so pipelines.cli.main (the entry point) runs it
__all__ = ["app", "main", "serve"]


if __name__ == "__main__":  # pragma: no cover
    main()
