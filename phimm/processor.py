"""Requests -> token ids and processed media: chat template, placeholder expansion, the Phi-4-multimodal HD
image transform and log-mel features (transformers' image processor and feature extractor, one item at a time
so that a row's input never depends on what else is in its batch)."""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from routers import RouteInput

from .errors import PlaceholderError, PromptError
from .tokenizer import AUDIO_TOKEN, IMAGE_TOKEN, PHI4MM_CHAT_TEMPLATE
from .types import AudioInput, ImageInput, Prepared, Request, hd_grid, tensor_nbytes

# <|image|>, <|image_3|>, <|audio|>, <|audio_1|>; the raw placeholder tokens count too.
_PLACEHOLDER = re.compile(r"<\|(image|audio)(?:_(\d+))?\|>|" + re.escape(IMAGE_TOKEN) + "|" + re.escape(AUDIO_TOKEN))
IMAGE_PLACEHOLDER = "<|image|>"
AUDIO_PLACEHOLDER = "<|audio|>"


def image_token_count(attention_mask: torch.Tensor, size: tuple[int, int], crop: int, patch: int) -> int:
    """LM tokens for one HD-transformed image, as the Phi-4-multimodal image embedding lays them out: the global
    crop's f x f pooled features plus one row separator per row, one global separator, then the useful part of
    the sub-crop grid plus one separator per row (f = ceil(crop / patch / 2))."""
    f = (crop // patch + 1) // 2
    _, _, useful_h, useful_w = hd_grid(attention_mask, size, crop, f)
    return f * f + f + 1 + useful_h * useful_w + useful_h


class MediaCache:
    """Processed media of recently seen encoded files (`bytes`: what a server decodes from base64), by a hash of
    those bytes: a chat client sends the whole conversation, its image or clip included, at every turn, and each
    repeat skips decoding, the HD transform or the log-mel features. The entry is the same `ImageInput` /
    `AudioInput` object (nothing downstream writes to it). At most `max_bytes` of tensors; thread-safe. Only
    successes are kept: bad media fail again, with the same error."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[str, bytes], Any] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def get_or_make(self, kind: str, data, make):
        """`make(data)`, or what it gave for these bytes before. Inputs other than bytes are not cached."""
        if self.max_bytes <= 0 or not isinstance(data, (bytes, bytearray, memoryview)):
            return make(data)
        key = (kind, hashlib.blake2b(data, digest_size=16).digest())
        with self._lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
        item = make(data)
        size = tensor_nbytes(item)
        if size <= self.max_bytes:
            with self._lock:
                if key not in self.entries:
                    self.entries[key] = item
                    self.nbytes += size
                while self.nbytes > self.max_bytes:
                    _, old = self.entries.popitem(last=False)
                    self.nbytes -= tensor_nbytes(old)
        return item

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.nbytes = 0

    def __getstate__(self):  # a copy for another process starts empty
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["max_bytes"])


class Processor:
    """Turns a `Request` into `Prepared` input for one model. Encoded media given as bytes are processed once
    while they stay in `media_cache`."""

    def __init__(self, tokenizer, image_processor, feature_extractor, *, image_token_id: int, audio_token_id: int,
                 crop_size: int, patch_size: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.feature_extractor = feature_extractor
        self.image_token_id = image_token_id
        self.audio_token_id = audio_token_id
        self.crop_size = crop_size
        self.patch_size = patch_size
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = PHI4MM_CHAT_TEMPLATE
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        self.audio_token = tokenizer.convert_ids_to_tokens(audio_token_id)
        self.media_cache = MediaCache()

    @classmethod
    def from_pretrained(cls, path: str | Path, config) -> "Processor":
        from transformers import AutoTokenizer, Phi4MultimodalFeatureExtractor, Phi4MultimodalImageProcessor

        path = Path(path)
        # with the model's config: AutoTokenizer would otherwise read config.json, and the original layout's asks
        # for remote code (`auto_map`)
        tokenizer = AutoTokenizer.from_pretrained(str(path), config=config)
        vc = config.vision_config
        kwargs = _processor_section(path, "image_processor")
        kwargs.setdefault("size", {"height": vc.crop_size, "width": vc.crop_size})
        kwargs.setdefault("patch_size", vc.patch_size)
        image_processor = Phi4MultimodalImageProcessor(**{k: v for k, v in kwargs.items() if not k.startswith("_")
                                                           and k != "image_processor_type"})
        fkwargs = _processor_section(path, "audio_processor")
        feature_extractor = Phi4MultimodalFeatureExtractor(**{k: v for k, v in fkwargs.items()
                                                              if k != "feature_extractor_type"})
        return cls(tokenizer, image_processor, feature_extractor, image_token_id=vc.image_token_id,
                   audio_token_id=config.audio_config.audio_token_id, crop_size=vc.crop_size,
                   patch_size=vc.patch_size)

    def save_pretrained(self, path: str | Path) -> None:
        from transformers import Phi4MultimodalProcessor

        Phi4MultimodalProcessor(self.image_processor, self.feature_extractor, self.tokenizer).save_pretrained(str(path))

    # ---- requests --------------------------------------------------------------------------------------------
    def render(self, request: Request) -> tuple[str, list, list]:
        """The prompt text (placeholders still symbolic) and the media, in the order they were given."""
        if isinstance(request, str):
            request = Request(prompt=request)
        if not isinstance(request, Request):
            raise PromptError(f"expected a prompt string or a phimm.Request, got {type(request).__name__}")
        images, audios = list(_as_list(request.images, "images")), list(_as_list(request.audios, "audios"))
        if request.messages is not None:
            if request.prompt is not None:
                raise PromptError("give either prompt or messages, not both")
            msgs, m_images, m_audios = self._flatten_messages(request.messages)
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            images, audios = m_images + images, m_audios + audios
        elif request.prompt is not None:
            if not isinstance(request.prompt, str):
                raise PromptError(f"prompt must be a string, got {type(request.prompt).__name__}")
            text = request.prompt
        else:
            raise PromptError("a request needs a prompt or messages")
        if not text.strip() and not images and not audios:
            raise PromptError("the prompt is empty: give some text or media")
        if not _PLACEHOLDER.search(text) and (images or audios):
            text = IMAGE_PLACEHOLDER * len(images) + AUDIO_PLACEHOLDER * len(audios) + text
        return text, images, audios

    def _flatten_messages(self, messages) -> tuple[list[dict], list, list]:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        out, images, audios = [], [], []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise PromptError(f"message {i} must be a dict with 'role' and 'content'")
            content = msg["content"]
            if isinstance(content, str):
                out.append({"role": msg["role"], "content": content})
                continue
            if not isinstance(content, (list, tuple)):
                raise PromptError(f"message {i}: content must be a string or a list of parts")
            pieces = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    pieces.append(str(part.get("text", "")))
                elif kind in ("image", "image_url"):
                    images.append(_part_media(part, ("image", "image_url", "url", "path"), i, j))
                    pieces.append(IMAGE_PLACEHOLDER)
                elif kind in ("audio", "input_audio"):
                    audios.append(_part_media(part, ("audio", "input_audio", "url", "path"), i, j))
                    pieces.append(AUDIO_PLACEHOLDER)
                else:
                    raise PromptError(f"message {i}, part {j}: type must be 'text', 'image' or 'audio', got {kind!r}")
            out.append({"role": msg["role"], "content": "".join(pieces)})
        return out, images, audios

    def prepare(self, request: Request | str) -> Prepared:
        """Validate and process one request (all checks happen here, before any compute on the model)."""
        text, images, audios = self.render(request)
        pieces = _split_placeholders(text, len(images), len(audios))
        # media in placeholder order
        cache = getattr(self, "media_cache", None) or MediaCache(0)
        image_inputs = {i: cache.get_or_make("image", images[i], self.process_image)
                        for i in {idx for kind, idx in pieces if kind == "image"}}
        audio_inputs = {i: cache.get_or_make("audio", audios[i], self.process_audio)
                        for i in {idx for kind, idx in pieces if kind == "audio"}}
        parts, ordered_images, ordered_audios = [], [], []
        for kind, value in pieces:
            if kind == "text":
                parts.append(value)
            elif kind == "image":
                img = image_inputs[value]
                ordered_images.append(img)
                parts.append(self.image_token * img.num_tokens)
            else:
                aud = audio_inputs[value]
                ordered_audios.append(aud)
                parts.append(self.audio_token * aud.num_tokens)
        ids = self.tokenizer("".join(parts))["input_ids"]
        n_img = sum(1 for t in ids if t == self.image_token_id)
        n_aud = sum(1 for t in ids if t == self.audio_token_id)
        if n_img != sum(i.num_tokens for i in ordered_images) or n_aud != sum(a.num_tokens for a in ordered_audios):
            raise PlaceholderError("the prompt holds raw image/audio placeholder tokens that do not match the media "
                                   "given; use <|image|> / <|audio|> placeholders")
        forced = request.adapter if isinstance(request, Request) else None
        route_input = RouteInput(num_images=len(ordered_images), num_audios=len(ordered_audios), forced=forced,
                                 text=text)
        return Prepared(ids, ordered_images, ordered_audios, route_input, text)

    def process_image(self, image) -> ImageInput:
        from . import media

        pil = media.load_image(image)
        try:
            out = self.image_processor(images=[pil], return_tensors="pt")
        except ValueError as e:  # e.g. an aspect ratio too extreme for the HD transform
            from .errors import ImageError

            raise ImageError(f"{media.describe(image)}: cannot be transformed for the model: {e}") from e
        size = tuple(int(v) for v in out["image_sizes"][0].tolist())
        mask = out["image_attention_mask"][0]
        n = image_token_count(mask, size, self.crop_size, self.patch_size)
        return ImageInput(out["image_pixel_values"][0], mask, size, n)

    def process_audio(self, audio) -> AudioInput:
        from . import media

        sr = self.feature_extractor.sampling_rate
        wave = media.load_audio(audio, sample_rate=sr, min_samples=self.feature_extractor.win_length)
        out = self.feature_extractor(wave, sampling_rate=sr, return_tensors="pt")
        n = int(out["audio_embed_sizes"][0])
        return AudioInput(out["audio_input_features"][0], n, len(wave) / sr)


def _processor_section(path: Path, key: str) -> dict[str, Any]:
    import json

    for name in ("processor_config.json", "preprocessor_config.json"):
        f = path / name
        if f.is_file():
            data = json.loads(f.read_text())
            if key in data:
                return dict(data[key])
            if name == "preprocessor_config.json":
                # the original layout's remote-code file is one flat dict: keep the settings phimm's processors share
                return {k: data[k] for k in _FLAT_KEYS.get(key, ()) if k in data}
    return {}


# settings of the original layout's flat preprocessor_config.json, per section
_FLAT_KEYS = {
    "image_processor": ("dynamic_hd",),
    "audio_processor": ("audio_compression_rate", "audio_downsample_rate", "audio_feat_stride"),
}


def _as_list(x, what: str) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        # a bare (array, rate) tuple is one audio, not two media
        if what == "audios" and len(x) == 2 and isinstance(x[1], int) and not isinstance(x[0], (str, Path)):
            return [tuple(x)]
        return list(x)
    return [x]


def _part_media(part: dict, keys: tuple[str, ...], i: int, j: int):
    for k in keys:
        if k in part and part[k] is not None:
            return part[k]
    raise PromptError(f"message {i}, part {j}: a {part.get('type')} part needs one of {list(keys)}")


def _split_placeholders(text: str, n_images: int, n_audios: int) -> list[tuple[str, Any]]:
    """[("text", s) | ("image", index) | ("audio", index)]; checks counts and numbering against the media."""
    pieces: list[tuple[str, Any]] = []
    pos = 0
    seen = {"image": [], "audio": []}
    numbered = {"image": set(), "audio": set()}
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            pieces.append(("text", text[pos : m.start()]))
        kind = m.group(1) or ("image" if m.group(0) == IMAGE_TOKEN else "audio")
        number = m.group(2)
        numbered[kind].add(number is not None)
        idx = int(number) - 1 if number is not None else len(seen[kind])
        seen[kind].append(idx)
        pieces.append((kind, idx))
        pos = m.end()
    if pos < len(text):
        pieces.append(("text", text[pos:]))
    for kind, n in (("image", n_images), ("audio", n_audios)):
        refs = seen[kind]
        if len(numbered[kind]) > 1:
            raise PlaceholderError(f"the prompt mixes numbered and plain {kind} placeholders; use one form")
        if len(refs) != n:
            raise PlaceholderError(
                f"the prompt has {len(refs)} {kind} placeholder(s) but {n} {kind}(s) were given; "
                f"give one <|{kind}|> per {kind}, or none to have them put in front of the prompt"
            )
        if sorted(refs) != list(range(n)):
            raise PlaceholderError(
                f"{kind} placeholders must number 1..{n}, each once; the prompt has {[r + 1 for r in refs]}"
            )
    return pieces
