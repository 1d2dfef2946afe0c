"""The published Phi-4-multimodal checkpoint as Microsoft wrote it (the remote-code, "original" layout).

What differs from transformers' native `phi4_multimodal` layout (see transformers' converter):

- `config.json` has `model_type` "phi4mm", the audio encoder under `audio_processor.config` with its own names
  (`attention_dim`, `linear_units`, ...), the embedding settings under `embd_layer`, and the two LoRAs as
  `vision_lora` / `speech_lora` dicts (`r`, `lora_alpha`, `dp`, `layer`). It does not describe the vision tower
  (SigLIP-so400m/14 at 448 is implied); phimm accepts an optional `vision_config` dict to override it, so that
  miniatures of the layout can exist.
- The LoRAs live inside the main shards, in peft's naming: `...qkv_proj.base_layer.weight` is the base weight,
  `...qkv_proj.lora_A.vision.weight` / `...lora_B.speech.weight` the adapters.
- Some modules have other names (`img_projection.0`, `glb_GN`, `audio_projection.speech.0`, `net.0.linear`, ...).

`load()` builds transformers' `Phi4MultimodalForCausalLM` with its parameters on the `meta` device (no memory),
then assigns every tensor as a view of the memory-mapped shard (no copy when the dtype already matches: the
weights are the file's pages), so loading the 11 GB checkpoint needs about 11 GB, not twice that.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

# ---- key names ---------------------------------------------------------------------------------------------------

_A = r"model\.embed_tokens_extend\.audio_embed\."
_I = r"model\.embed_tokens_extend\.image_embed\."
_AP = "model.embed_tokens_extend.audio_embed."
_IP = "model.embed_tokens_extend.image_embed."

# transformers' converter rules, in order; the first that matches the start of a key renames it.
ORIGINAL_TO_NATIVE_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(rf"^{_A}encoder\.encoders\.(\d+)\.feed_forward_(in|out)\.net\.0\.linear"),
     _AP + r"encoder.encoders.\1.feed_forward_\2.gate_up_proj"),
    (re.compile(rf"^{_A}encoder\.encoders\.(\d+)\.feed_forward_(in|out)\.net\.2"),
     _AP + r"encoder.encoders.\1.feed_forward_\2.down_proj"),
    (re.compile(rf"^{_A}encoder\.encoders\.(\d+)\.self_attn\.linear_(q|k|v)"), _AP + r"encoder.encoders.\1.self_attn.\2_proj"),
    (re.compile(rf"^{_A}encoder\.encoders\.(\d+)\.self_attn\.linear_out"), _AP + r"encoder.encoders.\1.self_attn.o_proj"),
    (re.compile(rf"^{_I}img_projection\.0"), _IP + "img_projection_up"),
    (re.compile(rf"^{_I}img_projection\.2"), _IP + "img_projection_down"),
    (re.compile(rf"^{_I}glb_GN"), _IP + "global_img_feature_extensor"),
    (re.compile(rf"^{_I}sub_GN"), _IP + "sub_img_feature_extensor"),
    (re.compile(rf"^{_A}audio_projection\.speech\.0"), _AP + "up_proj_for_speech"),
    (re.compile(rf"^{_A}audio_projection\.speech\.2"), _AP + "down_proj_for_speech"),
    (re.compile(rf"^{_A}audio_projection\.vision\.0"), _AP + "up_proj_for_vision_speech"),
    (re.compile(rf"^{_A}audio_projection\.vision\.2"), _AP + "down_proj_for_vision_speech"),
]

# the same renames backwards (native -> original); `base_layer.` is added separately for LoRA targets
NATIVE_TO_ORIGINAL_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(rf"^{_A}encoder\.encoders\.(\d+)\.feed_forward_(in|out)\.gate_up_proj\."),
     _AP + r"encoder.encoders.\1.feed_forward_\2.net.0.linear."),
    (re.compile(rf"^{_A}encoder\.encoders\.(\d+)\.feed_forward_(in|out)\.down_proj\."),
     _AP + r"encoder.encoders.\1.feed_forward_\2.net.2."),
    (re.compile(rf"^{_A}encoder\.encoders\.(\d+)\.self_attn\.(q|k|v)_proj\."), _AP + r"encoder.encoders.\1.self_attn.linear_\2."),
    (re.compile(rf"^{_A}encoder\.encoders\.(\d+)\.self_attn\.o_proj\."), _AP + r"encoder.encoders.\1.self_attn.linear_out."),
    (re.compile(rf"^{_I}img_projection_up\."), _IP + "img_projection.0."),
    (re.compile(rf"^{_I}img_projection_down\."), _IP + "img_projection.2."),
    (re.compile(rf"^{_I}global_img_feature_extensor$"), _IP + "glb_GN"),
    (re.compile(rf"^{_I}sub_img_feature_extensor$"), _IP + "sub_GN"),
    (re.compile(rf"^{_A}up_proj_for_speech\."), _AP + "audio_projection.speech.0."),
    (re.compile(rf"^{_A}down_proj_for_speech\."), _AP + "audio_projection.speech.2."),
    (re.compile(rf"^{_A}up_proj_for_vision_speech\."), _AP + "audio_projection.vision.0."),
    (re.compile(rf"^{_A}down_proj_for_vision_speech\."), _AP + "audio_projection.vision.2."),
]

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


def is_original_config(cfg: Mapping[str, Any]) -> bool:
    return "embd_layer" in cfg or cfg.get("model_type") == "phi4mm" or "vision_lora" in cfg


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


# ---- building on meta -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None):
    if dtype is None:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_empty(config, dtype: torch.dtype | None = None) -> nn.Module:
    """`Phi4MultimodalForCausalLM(config)` with every parameter on the `meta` device (no memory, no init), and
    its buffers computed for real on the CPU (rotary `inv_freq` and the like are not stored in checkpoints).
    Floating parameters and buffers are made in `dtype`, as transformers' `from_pretrained` does."""
    from accelerate import init_empty_weights
    from transformers import Phi4MultimodalForCausalLM

    config = copy.deepcopy(config)
    if dtype is not None:
        config.dtype = dtype
    with _default_dtype(dtype), init_empty_weights(include_buffers=False), _no_init():
        model = Phi4MultimodalForCausalLM(config)
    return model


def _no_init():
    """Skip transformers' weight init (every weight comes from the checkpoint; on meta it is only time spent).
    Buffers that are not stored are computed in the modules' constructors, which still run."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


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
    tied = tuple(_tied_keys(model))
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


def _tied_keys(model: nn.Module) -> list[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return []
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return list(tied.keys() if isinstance(tied, Mapping) else tied)


# ---- memory-mapped shards ---------------------------------------------------------------------------------------

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class MappedShards:
    """Tensors of safetensors files as views of private (copy-on-write) memory maps: writing to a tensor never
    changes the file, and nothing is read until a tensor is used.

    Each tensor gets its own map where the OS allows (POSIX), so that a tensor the runtime replaces (say, by a
    re-laid-out copy for oneDNN) gives its pages back when it is dropped; elsewhere one map per file is shared by
    its tensors."""

    def __init__(self, tensors: Mapping[str, Any]):
        """`tensors`: key -> an entry with `.file` (Path), `.dtype` (safetensors name), `.shape` and
        `.start` (absolute byte offset in the file) / `.nbytes` (phimm.formats.check.TensorInfo)."""
        self.tensors = dict(tensors)
        self._bytes: dict[Path, torch.Tensor] = {}
        self._libc = _libc_mmap()

    def _file_bytes(self, file: Path) -> torch.Tensor:
        t = self._bytes.get(file)
        if t is None:
            size = os.path.getsize(file)
            storage = torch.UntypedStorage.from_file(str(file), shared=False, nbytes=size)
            t = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,), (1,))
            self._bytes[file] = t
        return t

    def _map(self, file: Path, start: int, nbytes: int) -> torch.Tensor:
        """`nbytes` bytes of `file` from `start`, as a uint8 tensor over a map of their own (unmapped when the
        last tensor viewing it is freed)."""
        import ctypes
        import mmap
        import weakref

        libc = self._libc
        page = mmap.ALLOCATIONGRANULARITY
        off = start - start % page
        length = start + nbytes - off
        fd = os.open(file, os.O_RDONLY)
        try:
            addr = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, off)
        finally:
            os.close(fd)  # the map stays valid without the descriptor
        if addr in (None, ctypes.c_void_p(-1).value):
            raise CheckpointError(f"{file}: cannot map bytes {start}..{start + nbytes}: "
                                  f"{os.strerror(ctypes.get_errno())}")
        buf = (ctypes.c_uint8 * length).from_address(addr)
        weakref.finalize(buf, libc.munmap, addr, length)  # torch.frombuffer keeps `buf` alive while in use
        return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start - off)

    def get(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        dtype = ST_DTYPES.get(info.dtype)
        if dtype is None:
            raise CheckpointError(f"{info.file.name}: tensor {key} has dtype {info.dtype}, which phimm cannot read")
        if info.nbytes == 0:
            return torch.empty(tuple(info.shape), dtype=dtype)
        if self._libc is not None:
            raw = self._map(info.file, info.start, info.nbytes)
        else:
            raw = self._file_bytes(info.file)[info.start : info.start + info.nbytes]
        if info.start % dtype.itemsize:
            raw = raw.clone()  # not aligned for a view: copy this one tensor
        return raw.view(dtype).view(tuple(info.shape))

    def close(self) -> None:
        """Drop this object's whole-file maps (tensors still viewing a map keep it)."""
        self._bytes.clear()


def _libc_mmap():
    """libc's mmap / munmap through ctypes (POSIX), or None."""
    import ctypes
    import ctypes.util

    if os.name != "posix" or os.environ.get("PHIMM_MMAP_PER_FILE"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


# ---- loading -----------------------------------------------------------------------------------------------------


def load(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
         device_map=None):
    """Load an original-layout checkpoint: `phimm.checkpoint.Loaded(hf_model, {"vision": ..., "speech": ...},
    meta, layout="original")`. The checkpoint is checked first (headers only); weights in `dtype` that are
    already in `dtype` in the file are used in place (memory-mapped), the others converted one by one."""
    from ..checkpoint import Loaded, check_no_pickles
    from .check import check

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    check_no_pickles(path, allow_pickle=False)
    original = read_original_config(path)
    config = native_config(original, dtype)
    model = build_empty(config, dtype)
    report = check(path, model=model)  # raises CheckpointError naming what does not fit
    expected = report.expected

    shards = MappedShards(report.tensors)
    state: dict[str, torch.Tensor] = {}
    lora_state: dict[str, torch.Tensor] = {}
    for key in report.tensors:
        if split_lora_key(key) is not None:
            lora_state[key] = shards.get(key)  # kept as stored: A / B for the adapters
            continue
        t = shards.get(key)
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        state[expected.native[key]] = t
    shards.close()

    info = model.load_state_dict(state, strict=False, assign=True)
    del state
    missing = [k for k in info.missing_keys if k not in expected.tied]
    if missing or info.unexpected_keys:  # check() makes this unreachable; keep the model honest anyway
        raise CheckpointError(f"{path}: weights do not fit the model: missing {missing[:5]}, "
                              f"unexpected {list(info.unexpected_keys)[:5]}")
    if expected.tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: no weights for {still_meta[:5]} (left on the meta device)")
    model.eval().requires_grad_(False)

    adapters = _adapters(path, lora_state, expected)
    _check_peft_folders(path, adapters)

    if device_map is not None:
        model = _dispatch(model, device_map, dtype)
    elif torch.device(device).type != "cpu":
        model.to(device)
    meta = {"prompt_style": "original", "source_layout": "original",
            "lora": {n: {"r": s.r, "alpha": s.alpha, "dropout": s.dropout} for n, s in expected.lora.items()}}
    return Loaded(model, adapters, meta, layout="original")


def _adapters(path: Path, lora_state: Mapping[str, torch.Tensor], expected: ExpectedTensors) -> dict:
    from adapters import AdapterDataError, adapter_from_state_dict

    from ..errors import AdapterError
    from ..model import PHI4MM_LORA_TARGETS

    out = {}
    for name, spec in expected.lora.items():
        try:
            out[name] = adapter_from_state_dict(lora_state, name, spec.r, spec.alpha, dropout=spec.dropout,
                                                target_modules=PHI4MM_LORA_TARGETS, key_name=name)
        except AdapterDataError as e:
            raise AdapterError(f"{path}: {e}") from e
    return out


def _check_peft_folders(path: Path, adapters: Mapping[str, Any], samples: int = 3) -> None:
    """The published repo also ships `vision-lora/` and `speech-lora/` (peft): when present they must hold the
    same adapter as the main shards. `check()` has compared their headers (rank, alpha, keys, shapes); here a
    few tensors are compared by value (read one by one: the folders are not loaded)."""
    from safetensors import safe_open

    for name, adapter in adapters.items():
        folder = path / f"{name}-lora"
        f = folder / "adapter_model.safetensors"
        if not (folder / "adapter_config.json").is_file() or not f.is_file():
            continue
        paths = sorted(adapter.weights)
        picks = sorted({paths[0], paths[len(paths) // 2], paths[-1]})[:samples] if paths else []
        bad = []
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
            for p in picks:
                for ab, mine in zip("AB", adapter.weights[p]):
                    key = f"base_model.model.{p}.lora_{ab}.weight"
                    if key not in keys:
                        key = f"{p}.lora_{ab}.weight"
                    if key not in keys:
                        bad.append(f"{p}.lora_{ab} is not in the folder")
                        continue
                    theirs = st.get_tensor(key)
                    if theirs.shape != mine.shape or not torch.equal(theirs.to(mine.dtype), mine):
                        bad.append(f"{p}.lora_{ab}: the folder's values differ from the main shards' "
                                   f"{p}.lora_{ab}.{name}.weight")
        if bad:
            raise CheckpointError(f"{folder} does not agree with the {name} LoRA in the main shards: "
                                  + "; ".join(bad[:6]))


def _dispatch(model: nn.Module, device_map, dtype: torch.dtype) -> nn.Module:
    """Place the model over devices with accelerate (`"auto"`, `"balanced"`, `"sequential"`, or a dict of
    module prefix -> device)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    no_split += ["Phi4MultimodalVisionEncoderLayer", "Phi4MultimodalAudioConformerEncoderLayer",
                 "Phi4MultimodalFeatureEmbedding"]
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            device_map = {"": device_map}
        else:
            max_memory = None
            if device_map != "sequential":
                max_memory = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split,
                                                 low_zero=device_map == "balanced_low_0")
            device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                               dtype=dtype)
    elif isinstance(device_map, (torch.device, int)):
        device_map = {"": device_map}
    if not isinstance(device_map, Mapping):
        raise CheckpointError(f"device_map must be 'auto', 'balanced', 'sequential', a device or a dict, "
                              f"got {device_map!r}")
    device_map = dict(device_map)
    if any(str(d) == "disk" for d in device_map.values()):
        raise CheckpointError("the model does not fit in the devices' memory (device_map would offload to disk, "
                              "which phimm does not do); free memory or give max_memory / a device_map dict")
    devices = {str(d) for d in device_map.values()}
    if len(devices) == 1:
        only = next(iter(device_map.values()))
        model.to(only if not isinstance(only, int) else torch.device("cuda", only))
    else:
        model = dispatch_model(model, device_map=device_map)
    model.hf_device_map = device_map
    return model


__all__ = [
    "ORIGINAL_TO_NATIVE_RULES", "LoraSpec", "ExpectedTensors", "MappedShards", "original_to_native_key",
    "native_to_original_key", "split_lora_key", "native_config", "native_config_dict", "lora_specs",
    "lora_target_paths", "build_empty", "expected_tensors", "read_original_config", "is_original_config", "load",
]
