"""phimm's routing policies: map a request's modalities to a Route (adapter + audio projector) per batch row."""

from .default import FixedRouter, ModalityRouter, Router, resolve_router
from .learned import LearnedRouter
from .route import AudioProjector, Route, RouteInput, projector_for

__all__ = ["AudioProjector", "FixedRouter", "LearnedRouter", "ModalityRouter", "Route", "RouteInput", "Router", "projector_for",
           "resolve_router"]
