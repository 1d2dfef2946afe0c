"""phimm: a runtime for multimodal mixture-of-LoRAs models, routed per batch row.

    import phimm
    pipe = phimm.load()                       # the embedded default model, or a checkpoint path
    print(pipe("what color is the circle", images=...))
"""

from __future__ import annotations


def _check_adapters_package() -> None:
    import adapters

    if not getattr(adapters, "__phimm__", False):
        where = getattr(adapters, "__file__", None) or list(getattr(adapters, "__path__", []))
        raise ImportError(
            f"the `adapters` package imported from {where} is not phimm's: another library of that name (PyPI "
            "'adapters') shadows it. Uninstall it (`pip uninstall adapters`) or install phimm in its own "
            "virtual environment."
        )


_check_adapters_package()

from routers import AudioProjector, Route, RouteInput  # noqa: E402

from . import errors  # noqa: E402
from .generation import GenerationOptions  # noqa: E402
from .pipeline import Pipeline, compose, load  # noqa: E402
from .types import Output, Request  # noqa: E402

__version__ = "0.1.0"

__all__ = ["AudioProjector", "GenerationOptions", "Output", "Pipeline", "Request", "Route", "RouteInput", "compose",
           "errors", "load"]
