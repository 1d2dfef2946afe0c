"""Routing policies. A router maps a `RouteInput` to a `Route`; it never touches weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from .route import AudioProjector, Route, RouteInput, projector_for


@runtime_checkable
class Router(Protocol):
    def __call__(self, inp: RouteInput) -> Route: ...


class ModalityRouter:
    """The reference table (Phi-4-multimodal): text -> no adapter; image -> `vision`; audio -> `speech` with the
    speech projector; image + audio -> `vision` with the vision-speech projector.

    `table` maps (has_image, has_audio) to an adapter name (or None); a forced adapter on the request wins.
    """

    DEFAULT_TABLE: Mapping[tuple[bool, bool], str | None] = {
        (False, False): None,
        (True, False): "vision",
        (False, True): "speech",
        (True, True): "vision",
    }

    def __init__(self, table: Mapping[tuple[bool, bool], str | None] | None = None) -> None:
        self.table = dict(self.DEFAULT_TABLE if table is None else table)

    def __call__(self, inp: RouteInput) -> Route:
        if isinstance(inp.forced, Route):
            return inp.forced
        adapter = inp.forced if inp.forced is not None else self.table[(inp.has_image, inp.has_audio)]
        return Route(adapter=adapter, audio_projector=projector_for(inp))

    def __repr__(self) -> str:
        return f"ModalityRouter({self.table!r})"


class FixedRouter:
    """Every request takes one adapter (or none): useful to force a route for a whole run."""

    def __init__(self, adapter: str | None, audio_projector: AudioProjector | None = None) -> None:
        self.adapter = adapter
        self.audio_projector = audio_projector

    def __call__(self, inp: RouteInput) -> Route:
        if inp.forced is not None:
            return ModalityRouter()(inp)
        proj = self.audio_projector if inp.has_audio and self.audio_projector else projector_for(inp)
        return Route(adapter=self.adapter, audio_projector=proj)


def resolve_router(router: "Router | Callable[[RouteInput], Route] | type | None") -> Callable[[RouteInput], Route]:
    """Accept None (the default table), a router instance or any callable, or a router class (instantiated)."""
    if router is None:
        return ModalityRouter()
    if isinstance(router, type):
        router = router()
    if not callable(router):
        raise TypeError(f"a router must be callable (RouteInput -> Route), got {type(router).__name__}")
    return router
