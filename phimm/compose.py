"""Compositions of your own: a frozen Hugging Face causal LM, optional vision and speech encoders with their
projectors, and any number of peft LoRA adapters, routed per row as Phi-4-multimodal is.

    pipe = phimm.compose(base="qwen2-folder", vision="siglip-folder", speech="whisper-folder",
                         adapters={"vision": "peft-folder", "speech": "peft-folder", "speech-fr": "peft-folder"})
    pipe.save_pretrained("my-model")     # phimm's layout; phimm.json records the composition
    phimm.load("my-model")               # the same pipeline back

- **Base**: any `AutoModelForCausalLM` checkpoint whose decoder is transformers' usual stack (`model.layers`,
  `model.norm`, `model.embed_tokens`: Llama, Qwen2, Phi-3, Mistral and their kind; tested with Qwen2 and Phi-3).
  Its weights never change. CUDA graphs cover the decoders in `phimm.graphs.SUPPORTED_DECODERS`; others decode
  eagerly.
- **Vision**: a SigLIP or CLIP vision tower. SigLIP's last hidden states, or CLIP's penultimate ones without the
  class token (as LLaVA reads them), go through a 2-layer MLP projector (LLaVA's) into the LM's width: one LM
  token per patch.
- **Speech**: a Whisper encoder. Its 50 Hz states over the clip (Whisper always encodes a 30 s window; the
  states past the clip's end are dropped) are stacked `speech_stack` at a time and go through an MLP projector
  (Ultravox / Qwen2-Audio style). As in Phi-4-multimodal there are two speech projectors: `speech` for audio
  alone and `vision_speech` for audio beside an image; the router picks per row.
- **Placeholders**: `<|image|>` and `<|audio|>` are added to the tokenizer when absent. Their ids may lie beyond
  the LM's embeddings: rows never look them up (their positions take the media features), and the LM's
  embeddings and output head are not resized, so text rows are exactly the base model's.
- **Adapters**: peft LoRA folders of any rank on any of the base's linear layers (fused or separate q/k/v,
  `lm_head` too), each row with its own.

The projectors are new and randomly initialised (seeded) until trained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from adapters import LoraAdapter, load_peft_adapter
from adapters.errors import AdapterDataError
from routers import AudioProjector, ModalityRouter

from .errors import AdapterError, AudioError, CheckpointError, CompositionError, ImageError
from .model import ANY_LINEAR, MixtureModel
from .processor import Processor
from .types import AudioInput, ImageInput

IMAGE_TOKEN, AUDIO_TOKEN = "<|image|>", "<|audio|>"
PROJECTORS_FILE = "projectors.safetensors"
VISION_KINDS = {"siglip": "siglip", "siglip_vision_model": "siglip", "clip": "clip", "clip_vision_model": "clip"}


class VisionProjector(nn.Sequential):
    """LLaVA's projector: vision features -> Linear -> GELU -> Linear -> the LM's width."""

    def __init__(self, vision_hidden: int, hidden: int):
        super().__init__(nn.Linear(vision_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))


class SpeechProjector(nn.Module):
    """Stacked frames: `stack` consecutive encoder states concatenated, then Linear -> GELU -> Linear."""

    def __init__(self, speech_hidden: int, hidden: int, stack: int):
        super().__init__()
        self.stack = stack
        self.mlp = nn.Sequential(nn.Linear(speech_hidden * stack, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, states: torch.Tensor) -> torch.Tensor:  # [B, T, d], T a multiple of `stack`
        b, t, d = states.shape
        return self.mlp(states.reshape(b, t // self.stack, d * self.stack))


class ComposedModel(MixtureModel):
    """A composition's model: the base LM (`hf`), the encoders and projectors, the adapters."""

    family = "composition"

    def __init__(self, hf_model: nn.Module, *, image_token_id: int, audio_token_id: int,
                 vision: nn.Module | None = None, vision_kind: str | None = None, speech: nn.Module | None = None,
                 speech_stack: int = 4, adapters: Mapping[str, LoraAdapter] = (), lora_targets: str = ANY_LINEAR,
                 seed: int = 0):
        super().__init__(hf_model, (), lora_targets)
        self._image_token_id, self._audio_token_id = image_token_id, audio_token_id
        self.vision, self.vision_kind, self.speech, self.speech_stack = vision, vision_kind, speech, speech_stack
        hidden = hf_model.config.hidden_size
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.vision_projector = VisionProjector(vision.config.hidden_size, hidden) if vision is not None else None
            self.speech_projectors = nn.ModuleDict(
                {p.value: SpeechProjector(speech.config.d_model, hidden, speech_stack) for p in AudioProjector}
            ) if speech is not None else None
            for proj in (self.vision_projector, self.speech_projectors):
                for p in proj.parameters() if proj is not None else ():
                    if p.dim() > 1:  # the default init, drawn from this composition's own generator
                        bound = 1 / math.sqrt(p.shape[1])
                        p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=gen))
                    else:
                        p.zero_()
        for part in (self.vision, self.speech, self.vision_projector, self.speech_projectors):
            if part is not None:
                part.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        for adapter in dict(adapters).values():
            self.add_adapter(adapter)

    @property
    def image_token_id(self) -> int:
        return self._image_token_id

    @property
    def audio_token_id(self) -> int:
        return self._audio_token_id

    def _image_features(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        if self.vision is None:
            raise ImageError("this composition has no vision encoder")
        pixels = torch.cat([img.pixel_values for img in images]).to(self.device, self.dtype)
        if self.vision_kind == "clip":  # LLaVA: the penultimate layer, without the class token
            states = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        else:
            states = self.vision(pixel_values=pixels).last_hidden_state
        feats = self.vision_projector(states)  # [images, patches, hidden]
        return [f for f in feats]

    def _audio_features(self, audios: Sequence[AudioInput], projector: AudioProjector) -> list[torch.Tensor]:
        if self.speech is None:
            raise AudioError("this composition has no speech encoder")
        feats = torch.stack([a.features for a in audios]).to(self.device, self.dtype)  # [B, mel, frames]
        states = self.speech(feats).last_hidden_state  # [B, positions, d]
        n = audios[0].num_tokens
        keep = n * self.speech_stack
        if keep > states.shape[1]:  # the last stack runs past the window: zeros, as past a clip's end
            states = torch.cat([states, states.new_zeros(states.shape[0], keep - states.shape[1], states.shape[2])], 1)
        return [f for f in self.speech_projectors[projector.value](states[:, :keep])]

    # ---- saving --------------------------------------------------------------------------------------------
    def projector_state(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.vision_projector is not None:
            out.update({f"vision.{k}": v for k, v in self.vision_projector.state_dict().items()})
        if self.speech_projectors is not None:
            out.update({f"speech.{k}": v for k, v in self.speech_projectors.state_dict().items()})
        return out

    def load_projector_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Set the projectors from `state` (`projector_state`'s keys); a tensor that does not fit raises
        `CompositionError` and changes nothing."""
        parts = {"vision": self.vision_projector, "speech": self.speech_projectors}
        want = {}
        for prefix, mod in parts.items():
            for k, v in (mod.state_dict().items() if mod is not None else ()):
                want[f"{prefix}.{k}"] = v
        problems = sorted(set(want) ^ set(state))
        problems += [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in want.items()
                     if k in state and tuple(state[k].shape) != tuple(v.shape)]
        if problems:
            raise CompositionError(f"the projectors do not fit this composition's parts: {problems[:6]}")
        with torch.no_grad():
            for k, v in want.items():
                v.copy_(state[k].to(v.dtype))

    def save_parts(self, path: Path, processor: "ComposedProcessor") -> dict:
        """Write the parts into `path` (base/, vision/, speech/, the projectors); returns phimm.json's
        `composition` entry."""
        from safetensors.torch import save_file

        self.hf.save_pretrained(str(path / "base"))
        processor.tokenizer.save_pretrained(str(path / "base"))
        entry = {"base": "base", "vision": None, "vision_kind": self.vision_kind, "speech": None,
                 "speech_stack": self.speech_stack, "projectors": PROJECTORS_FILE,
                 "placeholders": [processor.image_token, processor.audio_token]}
        if self.vision is not None:
            self.vision.save_pretrained(str(path / "vision"))
            processor.image_processor.save_pretrained(str(path / "vision"))
            entry["vision"] = "vision"
        if self.speech is not None:
            self.speech.save_pretrained(str(path / "speech"))
            processor.feature_extractor.save_pretrained(str(path / "speech"))
            entry["speech"] = "speech"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.projector_state().items()},
                  str(path / PROJECTORS_FILE))
        return entry


class ComposedProcessor(Processor):
    """Requests for a composition: the base's tokenizer (placeholders added), the vision tower's image processor
    (one fixed-size image: one token per patch) and Whisper's feature extractor (a 30 s window)."""

    def __init__(self, tokenizer, image_processor=None, feature_extractor=None, *, image_tokens: int = 0,
                 speech_stack: int = 4, speech_positions: int = 1500):
        added = [t for t in (IMAGE_TOKEN, AUDIO_TOKEN) if t not in tokenizer.get_vocab()]
        if added:
            from tokenizers import AddedToken

            tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
        super().__init__(tokenizer, image_processor, feature_extractor,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN), crop_size=0, patch_size=0)
        self.image_tokens = image_tokens
        self.speech_stack = speech_stack
        self.speech_positions = speech_positions

    def process_image(self, image) -> ImageInput:
        from . import media

        if self.image_processor is None:
            raise ImageError("this composition has no vision encoder: it takes no images")
        pil = media.load_image(image)
        pixels = self.image_processor(images=[pil], return_tensors="pt")["pixel_values"]  # [1, 3, H, W]
        return ImageInput(pixels, torch.ones(1, dtype=torch.bool), tuple(pixels.shape[-2:]), self.image_tokens)

    def process_audio(self, audio) -> AudioInput:
        from . import media

        fe = self.feature_extractor
        if fe is None:
            raise AudioError("this composition has no speech encoder: it takes no audio")
        sr = fe.sampling_rate
        wave = media.load_audio(audio, sample_rate=sr, min_samples=fe.hop_length)
        if len(wave) > fe.n_samples:
            raise AudioError(f"{media.describe(audio)}: {len(wave) / sr:.1f} s is longer than the speech encoder's "
                             f"window of {fe.n_samples / sr:.0f} s")
        feats = fe(wave, sampling_rate=sr, return_tensors="pt")["input_features"][0]  # [mel, frames]
        frames = math.ceil(len(wave) / fe.hop_length)
        positions = min(self.speech_positions, math.ceil(frames * self.speech_positions / fe.nb_max_frames))
        return AudioInput(feats, math.ceil(positions / self.speech_stack), len(wave) / sr)

    def save_pretrained(self, path: str | Path) -> None:  # the parts save their own processors (save_parts)
        pass


# ---- building -------------------------------------------------------------------------------------------------


def load_base(path: str | Path, dtype: torch.dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot load a causal LM and its tokenizer: {e}") from e
    decoder = getattr(hf, "model", None)
    if decoder is None or not all(hasattr(decoder, a) for a in ("layers", "norm", "embed_tokens")):
        raise CompositionError(f"{path}: {type(hf).__name__} has no decoder stack phimm can run "
                               "(model.layers / model.norm / model.embed_tokens)")
    return hf.to(device).eval().requires_grad_(False), tokenizer


def load_vision(path: str | Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    try:
        kind = VISION_KINDS.get(AutoConfig.from_pretrained(str(path)).model_type)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read a vision encoder's config: {e}") from e
    if kind is None:
        raise CompositionError(f"{path}: not a SigLIP or CLIP vision checkpoint")
    cls = SiglipVisionModel if kind == "siglip" else CLIPVisionModel
    model = cls.from_pretrained(str(path), dtype=dtype).eval().requires_grad_(False)
    return model, kind, AutoImageProcessor.from_pretrained(str(path))


def load_speech(path: str | Path, dtype: torch.dtype):
    from transformers import AutoConfig, WhisperFeatureExtractor, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    try:
        model_type = AutoConfig.from_pretrained(str(path)).model_type
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read a speech encoder's config: {e}") from e
    if model_type != "whisper":
        raise CompositionError(f"{path}: not a Whisper checkpoint (model_type {model_type!r})")
    keys = _stored_keys(Path(path))
    if keys and not any(k.split(".")[0] in ("encoder", "model") for k in keys):
        encoder = WhisperEncoder.from_pretrained(str(path), dtype=dtype)  # an encoder saved alone (save_parts)
    else:
        encoder = WhisperModel.from_pretrained(str(path), dtype=dtype).encoder
    return encoder.eval().requires_grad_(False), WhisperFeatureExtractor.from_pretrained(str(path))


def _stored_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys.extend(st.keys())
    return keys


def default_router(adapters: Sequence[str]) -> ModalityRouter:
    """The modality table over the adapters a composition has: `vision` for images (and image + audio), `speech`
    for audio; a modality without its adapter runs on the base model alone."""
    has = set(adapters)
    vision = "vision" if "vision" in has else None
    speech = "speech" if "speech" in has else None
    return ModalityRouter({(False, False): None, (True, False): vision, (False, True): speech,
                           (True, True): vision or speech})


def build(base: str | Path, vision: str | Path | None = None, speech: str | Path | None = None,
          adapters: Mapping[str, str | Path] | None = None, *, dtype: torch.dtype = torch.float32, device="cpu",
          speech_stack: int = 4, seed: int = 0, projectors: str | Path | None = None
          ) -> tuple[ComposedModel, ComposedProcessor]:
    """The model and processor of a composition of local parts (`phimm.compose` makes a pipeline of them)."""
    hf, tokenizer = load_base(base, dtype, device)
    vis = kind = image_processor = None
    if vision is not None:
        vis, kind, image_processor = load_vision(vision, dtype)
    enc = feature_extractor = None
    if speech is not None:
        enc, feature_extractor = load_speech(speech, dtype)
    loaded = {}
    for name, folder in dict(adapters or {}).items():
        try:
            loaded[name] = load_peft_adapter(folder, name, dtype=dtype)  # shared with the layers: no second copy
        except AdapterDataError as e:
            raise AdapterError(str(e)) from e
    image_tokens = 0
    if vis is not None:
        cfg = vis.config
        image_tokens = (cfg.image_size // cfg.patch_size) ** 2
    positions = enc.config.max_source_positions if enc is not None else 1500
    processor = ComposedProcessor(tokenizer, image_processor, feature_extractor, image_tokens=image_tokens,
                                  speech_stack=speech_stack, speech_positions=positions)
    model = ComposedModel(hf, image_token_id=processor.image_token_id, audio_token_id=processor.audio_token_id,
                          vision=vis, vision_kind=kind, speech=enc, speech_stack=speech_stack, adapters=loaded,
                          seed=seed)
    if projectors is not None:
        from safetensors.torch import load_file

        model.load_projector_state(load_file(str(projectors)))
    return model, processor


def read_meta(path: Path) -> dict | None:
    from .formats.layout import PHIMM_FILE

    f = Path(path) / PHIMM_FILE
    return json.loads(f.read_text()) if f.is_file() else None
