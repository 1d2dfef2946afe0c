"""phimm: a runtime for multimodal mixture-of-LoRAs models, routed per batch row.

    import phimm
    pipe = phimm.load()                       # the embedded default model, or a checkpoint path
    print(pipe("what color is the circle", images=...))
"""

from __future__ import annotations

import os

# Large CPU tensors on 2 MiB pages: torch's CPU allocator asks for transparent huge pages (madvise) for
# allocations of 2 MiB or more when THP_MEM_ALLOC_ENABLE is set. A prefill allocates tens of MB per layer and
# frees it again; on 4 KiB pages every such buffer is faulted in page by page (a fresh 49 MB buffer: 11.8 ms to
# allocate and fill, 4.3 ms on huge pages; 209m gate_up over 3,420 tokens 52 -> 37 ms). torch reads the variable
# at its first allocation of that size, so it is set here, before any; export THP_MEM_ALLOC_ENABLE=0 to keep
# 4 KiB pages. (It changes nothing where the kernel's transparent_hugepage setting is "never".)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


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
