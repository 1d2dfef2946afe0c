"""The types that cross module lines: what a user hands the pipeline (`Request`), what the processor makes of it
for the model (`Prepared`, with `ImageInput` / `AudioInput`), and what comes back (`Output`). Nothing here imports
the processor or the model, so both import from here."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from routers import Route, RouteInput

from .errors import PhimmError


@dataclass
class Request:
    """One request: a prompt string or chat messages, plus media.

    - `prompt`: used verbatim; `<|image|>` / `<|audio|>` (or the original checkpoint's `<|image_1|>` /
      `<|audio_1|>`) mark where each medium goes; with no placeholders, they are put in front (images, then
      audios).
    - `messages`: chat messages whose content is a string or a list of parts
      (`{"type": "text", "text": ...}`, `{"type": "image", "image": ...}`, `{"type": "audio", "audio": ...}`),
      rendered through the tokenizer's chat template with the generation prompt.
    - `images`: PIL images, paths, bytes or arrays; `audios`: paths, `(array, sample_rate)` tuples or
      `{"array", "sampling_rate"}` dicts.
    - `adapter`: force an adapter by name (or a full `Route`; `Route(None)` forces the base model alone).
    """

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    images: tuple | list = ()
    audios: tuple | list = ()
    adapter: str | Route | None = None


def hd_grid(attention_mask: torch.Tensor, size: tuple[int, int], crop: int, f: int) -> tuple[int, int, int, int]:
    """The HD sub-crop grid of one image, as the Phi-4-multimodal image embedding lays it out: `(h_ratio,
    w_ratio, useful_h, useful_w)`, the crops per column and row and the pooled cells (f x f per crop, every
    second patch of the mask) that hold image rather than padding. The processor counts tokens with it, the model
    cuts the features with it."""
    h_ratio, w_ratio = size[0] // crop, size[1] // crop
    grid = attention_mask[1 : 1 + h_ratio * w_ratio, 0::2, 0::2]  # [crops, f, f]
    grid = grid.reshape(h_ratio, w_ratio, f, f).transpose(1, 2).reshape(h_ratio * f, w_ratio * f)
    return h_ratio, w_ratio, int(grid[:, 0].sum()), int(grid[0, :].sum())


def tensor_digest(*parts) -> bytes:
    """A 16-byte hash of tensors (dtype, shape and bytes) and other values (their repr)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update((t.view(torch.uint8) if t.dtype == torch.bfloat16 else t).numpy())  # no copy: its buffer
        else:
            h.update(repr(p).encode())
    return h.digest()


def tensor_nbytes(obj) -> int:
    """Bytes of the tensors among `obj`'s attributes (a processed medium's size, for caches bounded in bytes)."""
    return sum(t.numel() * t.element_size() for t in vars(obj).values() if isinstance(t, torch.Tensor))


@dataclass
class ImageInput:
    """One processed image: HD crops (global first), their patch masks, the padded HD size, its token count."""

    pixel_values: torch.Tensor  # [crops, 3, crop, crop]: pixel crops, global first (tokens put it last)
    attention_mask: torch.Tensor  # [crops, crop/patch, crop/patch]
    size: tuple[int, int]  # (height, width) after the HD transform
    num_tokens: int
    _digest: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def digest(self) -> bytes:
        """A hash of the processed content (the feature cache's key), computed once: the server's HTTP process
        makes it while it prepares the request, so the engine does not hash the crops again."""
        if self._digest is None:
            self._digest = tensor_digest(self.pixel_values, self.attention_mask, self.size)
        return self._digest


@dataclass
class AudioInput:
    """One processed audio clip: log-mel features and how many LM tokens the encoder makes of them."""

    features: torch.Tensor  # [frames, mel]
    num_tokens: int
    seconds: float
    _digest: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def digest(self) -> bytes:
        """A hash of the features (the feature cache's key), computed once (see `ImageInput.digest`)."""
        if self._digest is None:
            self._digest = tensor_digest(self.features)
        return self._digest


@dataclass
class Prepared:
    """One request made ready for the model."""

    input_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)
    audios: list[AudioInput] = field(default_factory=list)
    route_input: RouteInput = field(default_factory=RouteInput)
    prompt: str = ""


@dataclass
class Output:
    """One request's result. `error` is set (and `text` empty) only for a failed row of a batch."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    route: Route | None = None
    logits: torch.Tensor | None = None  # [steps, vocab], raw next-token logits, with output_logits=True
    error: PhimmError | None = None
    finish_reason: str | None = None  # "stop" (an end token), "length" (max_new_tokens), "error"
    prompt_tokens: int = 0
    ttft_s: float | None = None  # time to first token, from the start of the call
    decode_s: float | None = None  # time from the first to the last token
    total_s: float | None = None

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: tokens after the first per second (None with fewer than two tokens)."""
        if self.decode_s is None or len(self.token_ids) < 2 or self.decode_s <= 0:
            return None
        return (len(self.token_ids) - 1) / self.decode_s

    @property
    def ok(self) -> bool:
        return self.error is None

    def __str__(self) -> str:
        return self.text
