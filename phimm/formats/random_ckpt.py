"""Random-weight Phi-4-multimodal checkpoints of any size, in the original (remote-code) layout or in
transformers' native one, written shard by shard without ever holding the model in memory (a full-size one is
11.1 GB in bf16). Every tensor's values depend only on the seed and its original name, so the same seed gives
the same weights in both layouts.

    python -m phimm.formats.random_ckpt --layout original --size full --dtype bfloat16 --out DIR
    python -m phimm.formats.random_ckpt --layout hf --size tiny --out DIR

`--size full` follows the published checkpoint (`full_original_config()`, 2047 tensors); `--size tiny` a miniature
of the same layout (`shrink()`); `--shapes FILE` takes the tensor list from a JSON file (name -> shape, or
name -> {"shape": ...} as in the reference `tensor_shapes.DERIVED.json`, whose order sets the shard split).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import struct
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from . import original_keys as orig
from .check import INDEX_FILE, check
from .shards import ST_DTYPES, MappedShards

DEFAULT_SHARD_SIZE = 5_000_000_000  # what the published checkpoint used (greedy, in module order)
_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_CHUNK_ELEMENTS = 1 << 23  # values generated at a time

# The published config.json (reconstructed; see shared/phi4mm-reference/config.reconstructed.json).
_LONG_FACTOR = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898,
    2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424,
    6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
    16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6,
    32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]


def full_original_config() -> dict[str, Any]:
    """The published checkpoint's original `config.json`."""
    return {
        "_name_or_path": "Phi-4-multimodal-instruct",
        "architectures": ["Phi4MMForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "audio_processor": {
            "config": {
                "activation": "swish",
                "activation_checkpointing": {"interval": 1, "module": "transformer", "offload": False},
                "attention_dim": 1024, "attention_heads": 16, "batch_norm": False, "bias_in_glu": True,
                "causal": True, "chunk_size": -1, "cnn_layer_norm": True, "conv_activation": "swish",
                "conv_glu_type": "swish", "depthwise_multiplier": 1, "depthwise_seperable_out_channel": 1024,
                "dropout_rate": 0.0, "encoder_embedding_config": {"input_size": 80}, "ext_pw_kernel_size": 1,
                "ext_pw_out_channel": 1024, "input_layer": "nemo_conv", "input_size": 80, "kernel_size": 3,
                "left_chunk": 18, "linear_units": 1536, "nemo_conv_settings": {"conv_channels": 1024},
                "num_blocks": 24, "relative_attention_bias_args": {"t5_bias_max_distance": 500, "type": "t5"},
                "time_reduction": 8,
            },
            "name": "cascades",
        },
        "auto_map": {"AutoConfig": "configuration_phi4mm.Phi4MMConfig",
                     "AutoModelForCausalLM": "modeling_phi4mm.Phi4MMForCausalLM", "AutoTokenizer": "Xenova/gpt-4o"},
        "bos_token_id": 199999,
        "embd_layer": {
            "audio_embd_layer": {"compression_rate": 8, "downsample_rate": 1, "embedding_cls": "audio",
                                 "enable_gradient_checkpointing": True, "projection_cls": "mlp",
                                 "use_conv_downsample": False, "use_qformer": False},
            "embedding_cls": "image_audio",
            "image_embd_layer": {"crop_size": 448, "embedding_cls": "tune_image", "enable_gradient_checkpointing": True,
                                 "hd_transform_order": "sub_glb", "image_token_compression_cls": "avg_pool_2d",
                                 "projection_cls": "mlp", "use_hd_transform": True, "with_learnable_separator": True},
        },
        "embd_pdrop": 0.0,
        "eos_token_id": 199999,
        "full_attn_mod": 1,
        "hidden_act": "silu",
        "hidden_size": 3072,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "interpolate_factor": 1,
        "lm_head_bias": False,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "phi4mm",
        "num_attention_heads": 24,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "original_max_position_embeddings": 4096,
        "pad_token_id": 199999,
        "partial_rotary_factor": 0.75,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": list(_LONG_FACTOR), "short_factor": [1.0] * 48, "type": "longrope"},
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "speech_lora": {"dp": 0.01, "layer": r"((layers.*self_attn\.(qkv|o)_proj)|(layers.*mlp\.(gate_up|down)_proj))",
                        "lora_alpha": 640, "r": 320},
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.1",
        "use_cache": True,
        "vision_lora": {"dp": 0.0, "layer": r"layers.*((self_attn\.(qkv_proj|o_proj))|(mlp\.(gate_up|down)_proj))",
                        "lora_alpha": 512, "r": 256},
        "vocab_size": 200064,
        "_attn_implementation": "flash_attention_2",
    }


GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 199999, "eos_token_id": [200020, 199999],
                     "pad_token_id": 199999, "use_cache": True}
# the remote-code processor settings the published repo ships (flat, not sectioned)
ORIGINAL_PREPROCESSOR_CONFIG = {
    "auto_map": {"AutoProcessor": "processing_phi4mm.Phi4MMProcessor",
                 "AutoImageProcessor": "processing_phi4mm.Phi4MMImageProcessor",
                 "AutoFeatureExtractor": "processing_phi4mm.Phi4MMAudioFeatureExtractor"},
    "image_processor_type": "Phi4MMImageProcessor",
    "processor_class": "Phi4MMProcessor",
    "feature_extractor_type": "Phi4MMAudioFeatureExtractor",
    "audio_compression_rate": 8,
    "audio_downsample_rate": 1,
    "audio_feat_stride": 1,
    "dynamic_hd": 36,
}
ORIGINAL_PROCESSOR_CONFIG = {"auto_map": {"AutoProcessor": "processing_phi4mm.Phi4MMProcessor"},
                             "processor_class": "Phi4MMProcessor"}


# ---- tensor lists --------------------------------------------------------------------------------------------------


def shapes_from_config(original: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Original key -> shape for every tensor an original checkpoint with this config holds."""
    return dict(orig.expected_tensors(original).shapes)


def load_shapes(file: str | Path) -> dict[str, tuple[int, ...]]:
    """A tensor list from JSON: name -> shape, or name -> {"shape": [...], ...}; the file's order is kept."""
    data = json.loads(Path(file).read_text())
    return {k: tuple(v["shape"] if isinstance(v, Mapping) else v) for k, v in data.items()}


def shrink(config: Mapping[str, Any] | None = None, *, hidden: int = 64, intermediate: int = 128, layers: int = 2,
           heads: int = 4, kv_heads: int = 2, vision_hidden: int = 32, vision_layers: int = 2, vision_heads: int = 2,
           audio_hidden: int = 32, audio_blocks: int = 2, audio_heads: int = 2, nemo_channels: int = 16,
           lora_ranks: Mapping[str, int] | None = None,
           vocab_size: int | None = None) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """A miniature of an original config (default: the published one) and its tensor list, same layout: the same
    keys per layer, the real vocabulary and token ids, vision at the same crop and patch size (so the processor's
    HD transform is the real one), LoRA ranks `lora_ranks` (vision 8, speech 6) with alpha = 2 r."""
    cfg = copy.deepcopy(dict(config or full_original_config()))
    cfg.update(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads)
    if vocab_size:
        cfg["vocab_size"] = vocab_size
    rot = int(hidden // heads * cfg.get("partial_rotary_factor", 1.0)) // 2
    rs = cfg.get("rope_scaling") or {}
    for k in ("short_factor", "long_factor"):
        if k in rs:
            rs[k] = list(rs[k][:rot]) + [rs[k][-1]] * max(0, rot - len(rs[k]))
    crop = cfg.get("embd_layer", {}).get("image_embd_layer", {}).get("crop_size", 448)
    cfg["vision_config"] = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=crop,
                                crop_size=crop, patch_size=14)
    ac = cfg["audio_processor"]["config"]
    ac.update(attention_dim=audio_hidden, attention_heads=audio_heads, linear_units=audio_hidden * 3 // 2,
              num_blocks=audio_blocks, depthwise_seperable_out_channel=audio_hidden, ext_pw_out_channel=audio_hidden)
    ac["nemo_conv_settings"] = {"conv_channels": nemo_channels}
    ac["relative_attention_bias_args"] = {"t5_bias_max_distance": 100, "type": "t5"}
    for name, r in (lora_ranks or {"vision": 8, "speech": 6}).items():
        spec = dict(cfg.get(f"{name}_lora") or {"dp": 0.0, "layer": None})
        spec.update(r=int(r), lora_alpha=2 * int(r))
        cfg[f"{name}_lora"] = spec
    return cfg, shapes_from_config(cfg)


# ---- values ------------------------------------------------------------------------------------------------------


def _init_kind(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the random values of one tensor: roughly what trained weights look like in scale, so that
    activations stay finite through the full depth in bf16."""
    leaf = key.rsplit(".", 1)[-1]
    lora = orig.split_lora_key(key)
    if lora is not None:
        path, ab, _ = lora
        if ab == "A":
            return 0.0, 1.0 / math.sqrt(max(1, shape[1]))
        return 0.0, 0.05 / math.sqrt(max(1, shape[1]))
    if key.endswith(("glb_GN", "sub_GN")):
        return 0.0, 0.5
    if key.endswith("global_mean"):
        return -5.0, 1.0
    if key.endswith("global_invstd"):
        return 0.3, 0.02
    if key.endswith(("embed_tokens.weight", "position_embedding.weight", "bias_values.weight", "head.probe")):
        return 0.0, 0.02
    if len(shape) == 1:
        return (1.0, 0.02) if leaf == "weight" else (0.0, 0.02)
    if leaf in ("b1", "b2") or leaf.endswith("bias"):
        return 0.0, 0.02
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return 0.0, 1.0 / math.sqrt(max(1, fan_in))


def random_chunks(key: str, shape: Sequence[int], dtype: torch.dtype, seed: int = 0) -> Iterator[torch.Tensor]:
    """The values of tensor `key` in row-major chunks (at most ~8M values each); the same for the same (seed,
    key, shape, dtype), whatever the layout it is written in."""
    shape = tuple(int(d) for d in shape)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (1 << 62))
    mean, std = _init_kind(key, shape)
    numel = math.prod(shape)
    if numel == 0:
        return
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    rows_total = shape[0] if shape else 1
    rows = max(1, _CHUNK_ELEMENTS // max(1, row))
    for r0 in range(0, rows_total, rows):
        n = min(rows, rows_total - r0) * row
        x = torch.randn(n, generator=g)
        x.mul_(std).add_(mean)
        yield x.to(dtype)


# ---- streaming safetensors -----------------------------------------------------------------------------------------


def _header_bytes(entries: Sequence[tuple[str, tuple[int, ...], str]], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    off = 0
    for key, shape, st in entries:
        n = math.prod(shape) * _st_itemsize(st)
        header[key] = {"dtype": st, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    return raw


def _st_itemsize(st: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}[st]


def write_safetensors(file: str | Path, entries: Sequence[tuple[str, tuple[int, ...], str]],
                      chunks: Callable[[str], Iterator[torch.Tensor]], metadata: Mapping[str, str] | None = None) -> int:
    """Write one safetensors file tensor by tensor: `entries` (key, shape, safetensors dtype) in file order, and
    `chunks(key)` yielding the tensor's values in row-major pieces. Returns the bytes of tensor data written."""
    head = _header_bytes(entries, metadata or {"format": "pt"})
    total = 0
    tmp = Path(str(file) + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for key, shape, st in entries:
            want = math.prod(shape) * _st_itemsize(st)
            got = 0
            for c in chunks(key):
                buf = c.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(buf))
                got += buf.nbytes
            if got != want:
                raise CheckpointError(f"{key}: wrote {got} bytes, its shape {list(shape)} {st} needs {want}")
            total += got
    tmp.replace(file)
    return total


def _split_shards(entries: Sequence[tuple[str, tuple[int, ...], str]], shard_size: int) -> list[list]:
    """Greedy, in order (as transformers' `save_pretrained` shards): a new shard when the next tensor would
    pass `shard_size`."""
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        n = math.prod(e[1]) * _st_itemsize(e[2])
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def write_sharded(out_dir: Path, entries: Sequence[tuple[str, tuple[int, ...], str]],
                  chunks: Callable[[str], Iterator[torch.Tensor]], shard_size: int = DEFAULT_SHARD_SIZE,
                  progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` (one shard: `model.safetensors`).
    Returns key -> shard file name."""
    shards = _split_shards(entries, shard_size)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(out_dir / name, shard, chunks)
        weight_map.update({key: name for key, _, _ in shard})
        if progress:
            progress(f"wrote {name} ({len(shard)} tensors)")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


# ---- checkpoints ---------------------------------------------------------------------------------------------------


def _stand_in_tokenizer():
    from ..testing import CORPUS
    from ..tokenizer import PHI4MM_SPECIAL_TOKENS, build_tokenizer

    return build_tokenizer(CORPUS * 20, vocab_size=400, special_tokens=PHI4MM_SPECIAL_TOKENS)


def _peft_config(spec: orig.LoraSpec) -> dict[str, Any]:
    from ..model import PHI4MM_LORA_TARGETS

    try:
        from peft import LoraConfig

        return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, task_type="CAUSAL_LM",
                          target_modules=PHI4MM_LORA_TARGETS).to_dict() | {"peft_type": "LORA",
                                                                           "task_type": "CAUSAL_LM"}
    except ImportError:  # the same fields peft writes that matter
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.r, "lora_alpha": spec.alpha,
                "lora_dropout": spec.dropout, "target_modules": PHI4MM_LORA_TARGETS, "bias": "none",
                "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False}


def _json_default(o):
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if hasattr(o, "value"):
        return o.value
    return str(o)


def write_peft_folder(folder: Path, spec: orig.LoraSpec, keys: Sequence[tuple[str, tuple[int, ...], str]],
                      chunks: Callable[[str], Iterator[torch.Tensor]]) -> None:
    """`<name>-lora/` as transformers' converter writes it: `base_model.model.<path>.lora_A.weight` etc. `keys`
    are the original LoRA keys (`<path>.lora_A.<name>.weight`) of this adapter."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = _peft_config(spec)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=_json_default) + "\n")
    rename = {}
    entries = []
    for key, shape, st in keys:
        path, ab, _ = orig.split_lora_key(key)
        new = f"base_model.model.{path}.lora_{ab}.weight"
        rename[new] = key
        entries.append((new, shape, st))
    write_safetensors(folder / "adapter_model.safetensors", entries, lambda k: chunks(rename[k]))


def _write_common(out: Path, layout: str, config: Mapping[str, Any], dtype: torch.dtype, tokenizer) -> None:
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    tok = tokenizer if tokenizer is not None else _stand_in_tokenizer()
    if layout == "original":
        cfg = dict(config)
        cfg["torch_dtype"] = str(dtype).replace("torch.", "")
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tok.save_pretrained(str(out))
        (out / "preprocessor_config.json").write_text(json.dumps(ORIGINAL_PREPROCESSOR_CONFIG, indent=2) + "\n")
        (out / "processor_config.json").write_text(json.dumps(ORIGINAL_PROCESSOR_CONFIG, indent=2) + "\n")
    else:
        from transformers import (Phi4MultimodalFeatureExtractor, Phi4MultimodalImageProcessor,
                                  Phi4MultimodalProcessor)

        native = orig.native_config(config, dtype)
        native.architectures = ["Phi4MultimodalForCausalLM"]
        native.save_pretrained(str(out))
        vc = native.vision_config
        Phi4MultimodalProcessor(
            Phi4MultimodalImageProcessor(size={"height": vc.crop_size, "width": vc.crop_size},
                                         patch_size=vc.patch_size, dynamic_hd=36),
            Phi4MultimodalFeatureExtractor(), tok,
        ).save_pretrained(str(out))


def write_checkpoint(out_dir: str | Path, shapes: Mapping[str, Sequence[int]], chunks: Callable[[str], Iterator[torch.Tensor]],
                     *, layout: str = "original", dtype: torch.dtype = torch.bfloat16,
                     config: Mapping[str, Any] | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                     peft_folders: bool | None = None, tokenizer=None,
                     progress: Callable[[str], None] | None = None) -> Path:
    """Write a checkpoint whose tensors (original names -> shapes, in file order) come from `chunks(key)`:
    the original layout (LoRAs inside the shards; `peft_folders=True` adds `<name>-lora/` as the published repo
    does) or transformers' native one (renamed base weights, LoRAs in `<name>-lora/` peft folders)."""
    if layout not in ("original", "hf"):
        raise ValueError(f"layout must be 'original' or 'hf', got {layout!r}")
    config = dict(config or full_original_config())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    st = _ST_NAMES[dtype]
    specs = orig.lora_specs(config)
    lora_keys: dict[str, list] = {n: [] for n in specs}
    base: list[tuple[str, tuple[int, ...], str]] = []
    all_entries: list[tuple[str, tuple[int, ...], str]] = []
    for key, shape in shapes.items():
        e = (key, tuple(int(d) for d in shape), st)
        all_entries.append(e)
        lk = orig.split_lora_key(key)
        if lk is not None:
            if lk[2] not in lora_keys:
                raise CheckpointError(f"{key}: a LoRA named {lk[2]!r} that config.json does not declare")
            lora_keys[lk[2]].append(e)
        else:
            base.append(e)
    if layout == "original":
        write_sharded(out, all_entries, chunks, shard_size, progress)
        with_peft = bool(peft_folders)
    else:
        rename: dict[str, str] = {}
        native_entries = []
        for key, shape, s in base:
            new = orig.original_to_native_key(key)
            rename[new] = key
            native_entries.append((new, shape, s))
        write_sharded(out, native_entries, lambda k: chunks(rename[k]), shard_size, progress)
        with_peft = True if peft_folders is None else peft_folders
    if with_peft:
        for name, spec in specs.items():
            folder = out / f"{name}-lora"
            if folder.exists():
                shutil.rmtree(folder)
            write_peft_folder(folder, spec, lora_keys[name], chunks)
            if progress:
                progress(f"wrote {name}-lora/")
    _write_common(out, layout, config, dtype, tokenizer)
    return out


def write_random_checkpoint(out_dir: str | Path, shapes: Mapping[str, Sequence[int]] | None = None, *,
                            layout: str = "original", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            config: Mapping[str, Any] | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                            peft_folders: bool | None = None, tokenizer=None,
                            progress: Callable[[str], None] | None = None) -> Path:
    """A random-weight checkpoint: `shapes` original key -> shape (default: what `config` implies; `config`
    default: the published one). The same seed gives the same weights in either layout. Streams: memory use is
    one chunk of values, whatever the model's size."""
    config = dict(config or full_original_config())
    if shapes is None:
        shapes = shapes_from_config(config)
    return write_checkpoint(out_dir, shapes, lambda k: random_chunks(k, shapes[k], dtype, seed), layout=layout,
                            dtype=dtype, config=config, shard_size=shard_size, peft_folders=peft_folders,
                            tokenizer=tokenizer, progress=progress)


def convert_original_to_hf(src: str | Path, dst: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE,
                           progress: Callable[[str], None] | None = None) -> Path:
    """Convert an original-layout checkpoint to transformers' native layout (what transformers' converter
    does), tensor by tensor from the memory-mapped shards: it never holds more than one tensor in memory. The
    tokenizer files are copied."""
    src, dst = Path(src), Path(dst)
    report = check(src)
    config = orig.read_original_config(src)
    shards = MappedShards(report.tensors)
    dtypes = {t.dtype for t in report.tensors.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in ("BF16", "F16", "F32", "F64"):
        raise CheckpointError(f"{src}: expected one floating dtype in the shards, found {sorted(dtypes)}")
    dtype = ST_DTYPES[next(iter(dtypes))]
    shapes = {k: t.shape for k, t in report.tensors.items()}
    order = list(report.expected.shapes)  # module order
    shapes = {k: shapes[k] for k in order}
    from transformers import AutoTokenizer

    # with the converted config: AutoTokenizer would otherwise read the original config.json (remote code)
    tok = AutoTokenizer.from_pretrained(str(src), config=orig.native_config(config))
    return write_checkpoint(dst, shapes, lambda k: iter([shards.get(k)]), layout="hf", dtype=dtype, config=config,
                            shard_size=shard_size, tokenizer=tok, progress=progress)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m phimm.formats.random_ckpt",
                                 description="Write a random-weight Phi-4-multimodal checkpoint (streamed).")
    ap.add_argument("--layout", choices=["original", "hf"], default="original")
    ap.add_argument("--size", choices=["full", "tiny"], default="tiny")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shapes", help="tensor list JSON (original names), e.g. tensor_shapes.DERIVED.json")
    ap.add_argument("--config", help="original config.json to follow (default: the published one)")
    ap.add_argument("--shard-size", type=int, default=None, help="bytes per shard (default 5e9; tiny: 20e6)")
    ap.add_argument("--peft-folders", action="store_true",
                    help="original layout: also write vision-lora/ and speech-lora/ as the published repo has")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    config = json.loads(Path(args.config).read_text()) if args.config else full_original_config()
    if args.size == "tiny":
        config, shapes = shrink(config)
        shard = args.shard_size or 20_000_000
    else:
        shapes = load_shapes(args.shapes) if args.shapes else shapes_from_config(config)
        shard = args.shard_size or DEFAULT_SHARD_SIZE
    nbytes = sum(math.prod(s) for s in shapes.values()) * _st_itemsize(_ST_NAMES[dtype])
    free = shutil.disk_usage(Path(args.out).resolve().parent if not Path(args.out).exists() else args.out).free
    if nbytes * 1.02 > free:
        print(f"error: {nbytes / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free", file=sys.stderr)
        return 1
    print(f"writing {len(shapes)} tensors, {nbytes / 1e9:.3f} GB, {args.layout} layout -> {args.out}", flush=True)
    write_random_checkpoint(args.out, shapes, layout=args.layout, dtype=dtype, seed=args.seed, config=config,
                            shard_size=shard, peft_folders=args.peft_folders or None,
                            progress=lambda m: print(m, flush=True))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
