"""Which layout a checkpoint folder is in, and what loading one gives back: the ground floor of `phimm.checkpoint`
and the format modules (`phimm.formats.*`), which all import from here and never from each other's loaders.

Layouts (`detect_layout()`), decided from the files' contents, not from names:

- `"hf"`: transformers-native Phi-4-multimodal (`config.json` with model_type `phi4_multimodal`, safetensors,
  peft adapters in `<name>-lora/` folders).
- `"phimm"`: the same plus `phimm.json` (`PHIMM_FILE`: which adapter folders to load, the routing table,
  generation defaults; `FORMAT_VERSION` is written into it).
- `"original"`: the published checkpoint's original (remote-code) layout (`is_original_config()`), read by
  `phimm.formats.original`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, UnsafeCheckpointError

if TYPE_CHECKING:
    import torch

    from adapters import LoraAdapter

PHIMM_FILE = "phimm.json"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Loaded:
    """What a loader gives back: the transformers model, the adapters by name, phimm.json's contents (or what a
    format loader says about itself) and the layout it was read from."""

    hf_model: torch.nn.Module
    adapters: dict[str, LoraAdapter]
    meta: dict[str, Any] = field(default_factory=dict)
    layout: str = "hf"


def is_original_config(cfg: Mapping[str, Any]) -> bool:
    """Whether a `config.json`'s contents are the original (remote-code) Phi-4-multimodal config."""
    return "embd_layer" in cfg or cfg.get("model_type") == "phi4mm" or "vision_lora" in cfg


def detect_layout(path: Path) -> str:
    """'phimm', 'hf' or 'original', decided from the files' contents (not from names)."""
    path = Path(path)
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
    if is_original_config(cfg):
        return "original"
    raise CheckpointError(
        f"{path}: config.json has model_type {cfg.get('model_type')!r}; phimm reads Phi-4-multimodal checkpoints "
        "(transformers-native 'phi4_multimodal', the original 'phi4mm') and its own layout"
    )


def check_no_pickles(path: Path, allow_pickle: bool) -> None:
    """Refuse a folder whose weights are only in pickle files (loading them can run code) unless `allow_pickle`."""
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
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


__all__ = ["FORMAT_VERSION", "PHIMM_FILE", "PICKLE_SUFFIXES", "Loaded", "adapter_folders", "check_no_pickles",
           "detect_layout", "is_original_config"]
