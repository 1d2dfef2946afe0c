"""The published Phi-4-multimodal checkpoint's original (remote-code) layout on paper: its key names, its
`config.json`, and the tensors a config implies. No file is read here but `config.json`; the loader is
`phimm.formats.original`, the shard reader `phimm.formats.shards`.

What differs from transformers' native `phi4_multimodal` layout (see transformers' converter):

- `config.json` has `model_type` "phi4mm", the audio encoder under `audio_processor.config` with its own names
  (`attention_dim`, `linear_units`, ...), the embedding settings under `embd_layer`, and the two LoRAs as
  `vision_lora` / `speech_lora` dicts (`r`, `lora_alpha`, `dp`, `layer`). It does not describe the vision tower
  (SigLIP-so400m/14 at 448 is implied); phimm accepts an optional `vision_config` dict to override it, so that
  miniatures of the layout can exist.
- The LoRAs live inside the main shards, in peft's naming: `...qkv_proj.base_layer.weight` is the base weight,
  `...qkv_proj.lora_A.vision.weight` / `...lora_B.speech.weight` the adapters.
- Some modules have other names (`img_projection.0`, `glb_GN`, `audio_projection.speech.0`, `net.0.linear`, ...):
  `RENAMES`, one table from which both directions' rules are derived.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .empty import build_empty, tied_keys
from .layout import is_original_config

# ---- key names ---------------------------------------------------------------------------------------------------

_AP = "model.embed_tokens_extend.audio_embed."
_IP = "model.embed_tokens_extend.image_embed."


@dataclass(frozen=True)
class Rename:
    """One renamed module or parameter: its original name and its transformers-native name, as templates whose
    `{field}`s stand for a part of the key (`PLACEHOLDERS`), the same in both. `param`: the name is a tensor
    itself (`glb_GN`), not a module whose tensors follow after a dot."""

    original: str
    native: str
    param: bool = False


PLACEHOLDERS = {"n": r"\d+", "io": "in|out", "qkv": "q|k|v"}

# transformers' converter renames, in order: the first whose original name starts a key renames it
RENAMES: tuple[Rename, ...] = (
    Rename(_AP + "encoder.encoders.{n}.feed_forward_{io}.net.0.linear",
           _AP + "encoder.encoders.{n}.feed_forward_{io}.gate_up_proj"),
    Rename(_AP + "encoder.encoders.{n}.feed_forward_{io}.net.2", _AP + "encoder.encoders.{n}.feed_forward_{io}.down_proj"),
    Rename(_AP + "encoder.encoders.{n}.self_attn.linear_{qkv}", _AP + "encoder.encoders.{n}.self_attn.{qkv}_proj"),
    Rename(_AP + "encoder.encoders.{n}.self_attn.linear_out", _AP + "encoder.encoders.{n}.self_attn.o_proj"),
    Rename(_IP + "img_projection.0", _IP + "img_projection_up"),
    Rename(_IP + "img_projection.2", _IP + "img_projection_down"),
    Rename(_IP + "glb_GN", _IP + "global_img_feature_extensor", param=True),
    Rename(_IP + "sub_GN", _IP + "sub_img_feature_extensor", param=True),
    Rename(_AP + "audio_projection.speech.0", _AP + "up_proj_for_speech"),
    Rename(_AP + "audio_projection.speech.2", _AP + "down_proj_for_speech"),
    Rename(_AP + "audio_projection.vision.0", _AP + "up_proj_for_vision_speech"),
    Rename(_AP + "audio_projection.vision.2", _AP + "down_proj_for_vision_speech"),
)

_FIELD = re.compile(r"\{(\w+)\}")


def _pattern(template: str) -> str:
    """A regex matching `template`: literal text escaped, each `{field}` a named group."""
    out, pos = [], 0
    for m in _FIELD.finditer(template):
        out += [re.escape(template[pos:m.start()]), f"(?P<{m[1]}>{PLACEHOLDERS[m[1]]})"]
        pos = m.end()
    return "".join(out) + re.escape(template[pos:])


def _replacement(template: str) -> str:
    """An `re.sub` replacement writing `template` with each `{field}` the matched group."""
    return _FIELD.sub(r"\\g<\1>", template.replace("\\", "\\\\"))


def _rules(direction: str) -> list[tuple[re.Pattern, str]]:
    rules = []
    for r in RENAMES:
        if direction == "to_native":  # the converter's rules: a prefix match
            rules.append((re.compile("^" + _pattern(r.original)), _replacement(r.native)))
        else:  # backwards, a whole module name (then its tensors' names) or a whole parameter name
            end, tail = ("$", "") if r.param else (r"\.", ".")
            rules.append((re.compile("^" + _pattern(r.native) + end), _replacement(r.original) + tail))
    return rules


# derived from RENAMES; `base_layer.` is added separately for LoRA targets
ORIGINAL_TO_NATIVE_RULES: list[tuple[re.Pattern, str]] = _rules("to_native")
NATIVE_TO_ORIGINAL_RULES: list[tuple[re.Pattern, str]] = _rules("to_original")

_LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])\.(?P<name>[^.]+)\.weight$")


def original_to_native_key(key: str) -> str | None:
    """The transformers-native name of an original key, None for LoRA tensors (which the converter drops)."""
    for pattern, repl in ORIGINAL_TO_NATIVE_RULES:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    if "lora" in key:
        return None
    if "base_layer." in key:
        return key.replace("base_layer.", "")
    return key


def native_to_original_key(key: str, lora_targets: Iterable[str] = ()) -> str:
    """The original name of a native state-dict key; `lora_targets` are the module paths that carry LoRAs
    (their weights are stored as `<path>.base_layer.weight`)."""
    path, _, leaf = key.rpartition(".")
    if path in set(lora_targets):
        return f"{path}.base_layer.{leaf}"
    for pattern, repl in NATIVE_TO_ORIGINAL_RULES:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


def split_lora_key(key: str) -> tuple[str, str, str] | None:
    """`(module path, "A" | "B", adapter name)` for `<path>.lora_A.<name>.weight`, else None."""
    m = _LORA_KEY.match(key)
    return (m["path"], m["ab"], m["name"]) if m else None


# ---- config ------------------------------------------------------------------------------------------------------

# SigLIP-so400m/14 at 448: what the original code builds (its config does not say so)
DEFAULT_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      image_size=448, patch_size=14, crop_size=448)
_DROP_TOP = ("_name_or_path", "architectures", "auto_map", "vision_lora", "speech_lora", "transformers_version",
             "_attn_implementation", "model_type", "embd_layer", "audio_processor", "vision_config", "torch_dtype",
             "dtype")
_DROP_AUDIO = ("activation_checkpointing", "cnn_layer_norm", "input_layer", "batch_norm", "encoder_embedding_config",
               "ext_pw_kernel_size", "bias_in_glu", "causal")
EOS_TOKEN_IDS = [199999, 200020]


def read_original_config(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json: not a model checkpoint folder")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON: {e}") from e
    if not is_original_config(cfg):
        raise CheckpointError(f"{f}: not an original (remote-code) Phi-4-multimodal config: no `embd_layer`, "
                              f"`vision_lora` or model_type 'phi4mm'")
    return cfg


def native_config_dict(original: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of transformers' `Phi4MultimodalConfig` for an original `config.json` (the
    converter's rules; plus an optional `vision_config` override and the misspelled
    `depthwise_seperable_out_channel`, which the converter leaves behind, carried over)."""
    src = copy.deepcopy(dict(original))
    out = {k: v for k, v in src.items() if k not in _DROP_TOP}
    embd = src.get("embd_layer") or {}
    audio_embd = embd.get("audio_embd_layer") or {}
    image_embd = embd.get("image_embd_layer") or {}

    vision = dict(DEFAULT_VISION)
    if "crop_size" in image_embd:
        vision["crop_size"] = vision["image_size"] = int(image_embd["crop_size"])
    override = src.get("vision_config") or {}
    vision.update(override)
    if "crop_size" in override and "image_size" not in override:
        vision["image_size"] = vision["crop_size"]

    audio = dict(((src.get("audio_processor") or {}).get("config")) or {})
    for k in _DROP_AUDIO:
        audio.pop(k, None)
    renames = {"attention_dim": "hidden_size", "attention_heads": "num_attention_heads",
               "linear_units": "intermediate_size", "depthwise_seperable_out_channel": "depthwise_separable_out_channel"}
    for old, new in renames.items():
        if old in audio:
            audio[new] = audio.pop(old)
    if "nemo_conv_settings" in audio:
        audio["nemo_conv_channels"] = audio.pop("nemo_conv_settings")["conv_channels"]
    if "relative_attention_bias_args" in audio:
        audio["bias_max_distance"] = audio.pop("relative_attention_bias_args")["t5_bias_max_distance"]
    if "downsample_rate" in audio_embd:
        audio["downsample_rate"] = audio_embd["downsample_rate"]

    out["vision_config"] = vision
    out["audio_config"] = audio
    out["eos_token_id"] = list(EOS_TOKEN_IDS)
    out.setdefault("tie_word_embeddings", True)
    return out


def native_config(original: Mapping[str, Any], dtype: torch.dtype | None = None):
    """transformers' `Phi4MultimodalConfig` for an original `config.json`."""
    from transformers import Phi4MultimodalConfig
    from transformers.utils import logging as hf_logging

    kwargs = native_config_dict(original)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # longrope's "original_max_position_embeddings" notice
    try:
        cfg = Phi4MultimodalConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json cannot be turned into a Phi-4-multimodal config: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    dt = dtype or _torch_dtype(original.get("torch_dtype") or original.get("dtype"))
    if dt is not None:
        cfg.dtype = dt
    return cfg


def _torch_dtype(name) -> torch.dtype | None:
    if isinstance(name, torch.dtype) or name is None:
        return name
    return getattr(torch, str(name).replace("torch.", ""), None)


# ---- LoRAs and the tensors a config implies ------------------------------------------------------------------------


@dataclass
class LoraSpec:
    """One LoRA of the original config (`vision_lora` / `speech_lora`)."""

    name: str
    r: int
    alpha: float
    dropout: float = 0.0
    layer: str | None = None  # regex over module paths inside the decoder model ("layers.0.self_attn.qkv_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def lora_specs(original: Mapping[str, Any]) -> dict[str, LoraSpec]:
    """name -> `LoraSpec` for every `<name>_lora` dict of the config (vision, speech)."""
    out = {}
    for key, val in original.items():
        if key.endswith("_lora") and isinstance(val, Mapping) and "r" in val:
            name = key[: -len("_lora")]
            r = int(val["r"])
            out[name] = LoraSpec(name, r, float(val.get("lora_alpha", r)), float(val.get("dp", 0.0)), val.get("layer"))
    return out


def lora_target_paths(model: nn.Module, spec: LoraSpec | None = None) -> list[str]:
    """The paths (inside `Phi4MultimodalForCausalLM`) of the decoder linears a LoRA of `spec` adapts. The
    original `layer` regex is matched, as peft does, in full against the path inside the decoder model."""
    from ..model import PHI4MM_LORA_TARGETS

    decoder = model.model
    out = []
    for name, mod in decoder.named_modules():
        if not isinstance(mod, nn.Linear) or name.startswith("embed_tokens_extend."):
            continue
        full = f"model.{name}"
        if spec is not None and spec.layer:
            ok = re.fullmatch(spec.layer, name) is not None
        else:
            ok = re.fullmatch(PHI4MM_LORA_TARGETS, full) is not None
        if ok:
            out.append(full)
    return out


@dataclass
class ExpectedTensors:
    """What a config implies for the original layout: original key -> shape (module order), and which native
    key each base tensor becomes."""

    shapes: dict[str, tuple[int, ...]]
    native: dict[str, str]  # original base key -> native key
    lora: dict[str, LoraSpec]
    targets: dict[str, list[str]]  # adapter name -> target module paths
    tied: tuple[str, ...] = ()


def expected_tensors(original: Mapping[str, Any], model: nn.Module | None = None) -> ExpectedTensors:
    """The tensors an original checkpoint with this config must hold (built on `meta`: nothing allocated)."""
    model = model if model is not None else build_empty(native_config(original))
    specs = lora_specs(original)
    targets = {name: lora_target_paths(model, spec) for name, spec in specs.items()}
    all_targets = sorted({p for paths in targets.values() for p in paths})
    tied = tuple(tied_keys(model))
    linears = {p: model.get_submodule(p) for p in all_targets}
    shapes: dict[str, tuple[int, ...]] = {}
    native: dict[str, str] = {}
    for key, t in model.state_dict().items():
        if key in tied:
            continue
        okey = native_to_original_key(key, all_targets)
        shapes[okey] = tuple(t.shape)
        native[okey] = key
        path, _, leaf = key.rpartition(".")
        if path in linears and leaf == "weight":
            lin = linears[path]
            for ab in ("A", "B"):
                for name, spec in specs.items():
                    if path in targets[name]:
                        shapes[f"{path}.lora_{ab}.{name}.weight"] = (
                            (spec.r, lin.in_features) if ab == "A" else (lin.out_features, spec.r))
    return ExpectedTensors(shapes, native, specs, targets, tied)


__all__ = [
    "DEFAULT_VISION", "EOS_TOKEN_IDS", "ExpectedTensors", "LoraSpec", "NATIVE_TO_ORIGINAL_RULES",
    "ORIGINAL_TO_NATIVE_RULES", "RENAMES", "Rename", "expected_tensors", "is_original_config", "lora_specs",
    "lora_target_paths", "native_config", "native_config_dict", "native_to_original_key", "original_to_native_key",
    "read_original_config", "split_lora_key",
]
