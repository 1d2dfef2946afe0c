"""Typed errors. Every error phimm raises on purpose is a `PhimmError`; its message says what was wrong and
what to do about it."""

from __future__ import annotations


class PhimmError(Exception):
    """Base class of every error phimm raises on purpose."""


class MediaError(PhimmError, ValueError):
    """An image or audio input that cannot be used."""


class ImageError(MediaError):
    """An image that cannot be read, is empty, too large, or of an unsupported kind."""


class AudioError(MediaError):
    """Audio that cannot be read, is empty, holds non-finite samples, or is too long."""


class UnsupportedMediaError(MediaError, TypeError):
    """A media object of a type phimm does not accept (say, an int where an image was expected)."""


class PromptError(PhimmError, ValueError):
    """A prompt or chat messages that cannot be turned into model input."""


class PlaceholderError(PromptError):
    """The prompt's `<|image|>` / `<|audio|>` placeholders do not match the media given."""


class AdapterError(PhimmError, ValueError):
    """An adapter that does not exist, or does not fit the base model."""


class UnknownAdapterError(AdapterError, KeyError):
    """A request or router names an adapter the model does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class RouteError(PhimmError, ValueError):
    """A route the model cannot run: it needs a part (encoder, projector, adapter) the checkpoint lacks."""


class GenerationConfigError(PhimmError, ValueError):
    """Generation options out of range (max_new_tokens <= 0, temperature < 0, ...)."""


class CheckpointError(PhimmError, ValueError):
    """A checkpoint that does not match its config, or that cannot be read safely."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based checkpoint (.bin / .pt) that was not explicitly allowed."""


class CompositionError(CheckpointError):
    """Parts that do not make a composition (`phimm.compose`): an encoder of an unknown kind, a base without a
    decoder stack phimm can run, projectors that do not fit the parts."""


class ContextLengthError(PromptError):
    """A prompt (plus the tokens asked for) longer than the model's context or the engine's KV-cache budget."""


class QueueFullError(PhimmError):
    """The serving engine's queue is full: the request was refused before any work; retry later."""


class EngineClosedError(PhimmError):
    """The serving engine was closed (or stopped on an internal error) before the request finished."""


class EngineError(PhimmError):
    """A model forward failed inside the serving engine; the rows of that forward end with this error and the
    engine goes on serving the others."""


__all__ = [
    "PhimmError",
    "MediaError",
    "ImageError",
    "AudioError",
    "UnsupportedMediaError",
    "PromptError",
    "PlaceholderError",
    "AdapterError",
    "UnknownAdapterError",
    "RouteError",
    "GenerationConfigError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "ContextLengthError",
    "QueueFullError",
    "EngineClosedError",
    "EngineError",
]
