"""Checkpoint layouts: detect, load, save.

- transformers-native Phi-4-multimodal: `config.json` (model_type `phi4_multimodal`), safetensors, tokenizer and
  processor files at the root, peft adapters in `vision-lora/` and `speech-lora/` (what transformers' converter
  writes).
- phimm's own: the same files plus `phimm.json` (which adapter folders to load, the routing table, generation
  defaults), so that transformers can read a phimm checkpoint too.
- the original (remote-code) layout: `phimm.formats.original`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters import AdapterDataError, LoraAdapter, load_peft_adapter

from .errors import AdapterError, CheckpointError, UnsafeCheckpointError

PHIMM_FILE = "phimm.json"
FORMAT_VERSION = 1
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Loaded:
    hf_model: torch.nn.Module
    adapters: dict[str, LoraAdapter]
    meta: dict[str, Any] = field(default_factory=dict)
    layout: str = "hf"


def detect_layout(path: Path) -> str:
    """'phimm', 'hf' or 'original', decided from the files' contents (not from names)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if (path / PHIMM_FILE).is_file():
        return "phimm"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json: not a model checkpoint folder")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type") == "phi4_multimodal":
        return "hf"
    if "embd_layer" in cfg or cfg.get("model_type") == "phi4mm" or "vision_lora" in cfg:
        return "original"
    raise CheckpointError(
        f"{path}: config.json has model_type {cfg.get('model_type')!r}; phimm reads Phi-4-multimodal checkpoints "
        "(transformers-native 'phi4_multimodal', the original 'phi4mm') and its own layout"
    )


def check_no_pickles(path: Path, allow_pickle: bool) -> None:
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    has_safetensors = any(path.glob("*.safetensors"))
    if pickles and not has_safetensors and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{path}: weights only in pickle files {pickles}; loading them can run code. Convert them to "
            "safetensors, or pass allow_pickle=True to load them with torch.load(weights_only=True)"
        )


def adapter_folders(path: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """name -> folder: from phimm.json, else every `<name>-lora/` subfolder holding a peft adapter."""
    if "adapters" in meta:
        out = {}
        for name, rel in meta["adapters"].items():
            folder = (path / rel).resolve()
            if path.resolve() not in folder.parents:
                raise CheckpointError(f"{path / PHIMM_FILE}: adapter folder {rel!r} points outside the checkpoint")
            out[name] = folder
        return out
    return {
        p.name[: -len("-lora")]: p
        for p in sorted(path.iterdir())
        if p.is_dir() and p.name.endswith("-lora") and (p / "adapter_config.json").is_file()
    }


def load_checkpoint(path: str | Path, *, dtype: torch.dtype, device: str | torch.device = "cpu", device_map=None,
                    allow_pickle: bool = False) -> Loaded:
    path = Path(path)
    layout = detect_layout(path)
    if layout == "original":
        from .formats import original

        return original.load(path, dtype=dtype, device=device, device_map=device_map)
    meta = json.loads((path / PHIMM_FILE).read_text()) if layout == "phimm" else {}
    check_no_pickles(path, allow_pickle)
    from transformers import Phi4MultimodalForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        hf, info = Phi4MultimodalForCausalLM.from_pretrained(
            str(path), use_safetensors=not allow_pickle, output_loading_info=True, **kwargs
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot load the model weights: {e}") from e
    report_mismatch(path, hf, info)
    if device_map is None:
        hf.to(device)
    hf.eval().requires_grad_(False)
    adapters = {}
    for name, folder in adapter_folders(path, meta).items():
        try:
            adapters[name] = load_peft_adapter(folder, name)
        except AdapterDataError as e:
            raise AdapterError(str(e)) from e
    return Loaded(hf, adapters, meta, layout)


def report_mismatch(path: Path, model: torch.nn.Module, info: dict) -> None:
    """Raise a CheckpointError naming missing / unexpected / mis-shaped tensors (a truncated download, a shard
    from another model)."""
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in tied)
    unexpected = sorted(info.get("unexpected_keys", ()))
    mismatched = list(info.get("mismatched_keys", ()))
    if not (missing or unexpected or mismatched):
        return
    shapes = dict(model.state_dict())
    lines = []
    for k in missing[:10]:
        lines.append(f"  missing: {k} {tuple(shapes[k].shape) if k in shapes else ''}")
    for k in unexpected[:10]:
        lines.append(f"  unexpected: {k}")
    for item in mismatched[:10]:
        lines.append(f"  wrong shape: {item}")
    more = len(missing) + len(unexpected) + len(mismatched) - len(lines)
    if more > 0:
        lines.append(f"  ... and {more} more")
    raise CheckpointError(f"{path}: the weights do not match config.json:\n" + "\n".join(lines))
