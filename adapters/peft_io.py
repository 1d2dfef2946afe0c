"""Reading and writing adapters in peft's folder format (`adapter_config.json` + `adapter_model.safetensors`)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import AdapterDataError
from .lora import LoraAdapter

_PEFT_PREFIX = "base_model.model."
# <module path>.lora_A[.<adapter name>].weight
_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight$")


def adapter_from_state_dict(
    state: Mapping[str, torch.Tensor], name: str, r: int, alpha: float, *, dropout: float = 0.0,
    target_modules=None, key_name: str | None = None,
) -> LoraAdapter:
    """Collect `<path>.lora_A[.<key_name>].weight` / `lora_B` pairs from `state` into a `LoraAdapter`.

    `key_name` picks one adapter out of a combined state dict (the original Phi-4-multimodal shards hold
    `...lora_A.vision.weight` and `...lora_A.speech.weight` side by side); keys of other adapters are skipped.
    """
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m is None:
            continue
        if m["name"] is not None and key_name is not None and m["name"] != key_name:
            continue
        path = m["path"]
        if path.startswith(_PEFT_PREFIX):
            path = path[len(_PEFT_PREFIX):]
        halves.setdefault(path, {})[m["ab"]] = tensor
    weights = {}
    for path, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterDataError(f"adapter {name!r}: {path} has lora_{''.join(ab)} but not both lora_A and lora_B")
        weights[path] = (ab["A"], ab["B"])
    if not weights:
        raise AdapterDataError(f"adapter {name!r}: no lora_A / lora_B tensors found")
    ranks = {a.shape[0] for a, _ in weights.values()}
    if ranks != {r}:
        raise AdapterDataError(f"adapter {name!r}: config says rank {r} but its tensors have rank(s) {sorted(ranks)}")
    return LoraAdapter(name=name, r=r, alpha=float(alpha), weights=weights, dropout=dropout,
                       target_modules=target_modules)


def load_peft_adapter(folder: str | Path, name: str, *, dtype: torch.dtype | None = None,
                      read=None) -> LoraAdapter:
    """Load a peft LoRA folder. Only safetensors are read: a pickle file is never executed. `read`: a callable
    `read(path) -> {key: tensor}` for `adapter_model.safetensors` (say, views of a memory map); default: every
    tensor read into memory through safetensors."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    weights_path = folder / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise AdapterDataError(f"{folder}: no adapter_config.json: not a peft adapter folder")
    if not weights_path.is_file():
        pickles = [p.name for p in folder.glob("adapter_model.*")]
        hint = f" (found {pickles}: convert it to safetensors first)" if pickles else ""
        raise AdapterDataError(f"{folder}: no adapter_model.safetensors{hint}")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterDataError(f"{folder}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    for flag in ("use_dora",):
        if cfg.get(flag):
            raise AdapterDataError(f"{folder}: {flag}=true is not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterDataError(f"{folder}: per-module rank_pattern / alpha_pattern are not supported")
    if read is not None:
        state = {k: t.to(dtype) if dtype is not None else t for k, t in read(weights_path).items()}
    else:
        state = {}
        with safe_open(weights_path, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                state[key] = t.to(dtype) if dtype is not None else t
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    if cfg.get("use_rslora"):
        alpha = alpha * (r ** 0.5)  # rsLoRA scales by alpha / sqrt(r): keep scale = alpha' / r
    return adapter_from_state_dict(state, name, r, alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
                                   target_modules=cfg.get("target_modules"))


def save_peft_adapter(adapter: LoraAdapter, folder: str | Path, base_model_name_or_path: str | None = None) -> None:
    """Write `adapter` as a peft folder that `peft.PeftModel.from_pretrained` can read."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    targets = adapter.target_modules
    if targets is None:
        targets = sorted({p.rsplit(".", 1)[-1] for p in adapter.weights})
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.r,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": base_model_name_or_path,
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = {}
    for path, (a, b) in adapter.weights.items():
        tensors[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = b.detach().contiguous().cpu()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
