"""The synthetic multi-source cervix image generator (`cervixqc synth`).

Names are imported lazily: render workers import this package, and pulling pandas and
pydantic into each of them would cost a second of start-up per process for nothing.
"""

from importlib import import_module

_EXPORTS = {
    "SynthResult": "writer", "generate": "writer",
    "PRESETS": "planning", "SynthConfig": "planning", "plan": "planning",
    "ImageSpec": "render", "SizePolicy": "render", "render_image": "render",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"pipelines.data.synth.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
