"""A model loading from its card, its failures named with the card. Its own module, below
both the weights folder and the loaders, so that `load_detector` and `load_stage2` name their
own failures: `eval-detector`, `bench-detector` and `propose-boxes` called `load_detector`
outside the weights folder's check and showed a traceback for a card whose config the
builder refused (an audit)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from models.io import WeightsIntegrityError
from pipelines.data.schema import validation_reasons


@contextmanager
def loading(card: str | Path) -> Iterator[None]:
    """Whatever fails while one model of a weights folder loads, named with its card: a
    missing card, a config key the builder does not take, tensors of another shape, a missing
    threshold or input size came out as a bare TypeError, RuntimeError, KeyError or IndexError
    (and as "Application startup failed" in the service)."""
    try:
        yield
    except WeightsIntegrityError:
        raise
    except FileNotFoundError:
        raise WeightsIntegrityError(f"{card}: missing") from None
    except ValidationError as e:
        raise WeightsIntegrityError(f"{card}: cannot load it ({validation_reasons(e)[:300]})") from None
    except (OSError, ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        reason = str(e).splitlines()[0][:300] if str(e) else ""
        raise WeightsIntegrityError(f"{card}: cannot load it ({type(e).__name__}: {reason})") from None
