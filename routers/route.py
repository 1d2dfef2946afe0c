"""What a router decides for one batch row."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class AudioProjector(str, enum.Enum):
    """Which projector maps speech-encoder output into the LM: speech alone, or speech beside an image."""

    SPEECH = "speech"
    VISION_SPEECH = "vision_speech"


@dataclass(frozen=True)
class Route:
    """One row's route: the LoRA adapter to apply (None: the base model alone) and the audio projector
    (None when the row has no audio)."""

    adapter: str | None = None
    audio_projector: AudioProjector | None = None

    def __str__(self) -> str:
        name = self.adapter or "none"
        if self.audio_projector is AudioProjector.VISION_SPEECH:
            return f"{name}+{self.audio_projector.value}"
        return name


@dataclass(frozen=True)
class RouteInput:
    """What a router sees of a request: its modalities and an adapter forced by the caller (or None)."""

    num_images: int = 0
    num_audios: int = 0
    forced: "str | Route | None" = None
    text: str = ""
    # the frozen base model's pooled prompt embedding, given only to routers that ask for it (`needs_features`)
    features: Any = None

    @property
    def has_image(self) -> bool:
        return self.num_images > 0

    @property
    def has_audio(self) -> bool:
        return self.num_audios > 0


def projector_for(inp: RouteInput) -> AudioProjector | None:
    """The reference rule: audio beside an image uses the vision-speech projector, audio alone the speech one."""
    if not inp.has_audio:
        return None
    return AudioProjector.VISION_SPEECH if inp.has_image else AudioProjector.SPEECH
