"""Checkpoint layouts: detect, load, save.

- transformers-native Phi-4-multimodal: `config.json` (model_type `phi4_multimodal`), safetensors, tokenizer and
  processor files at the root, peft adapters in `vision-lora/` and `speech-lora/` (what transformers' converter
  writes).
- phimm's own: the same files plus `phimm.json` (which adapter folders to load, the routing table, generation
  defaults), so that transformers can read a phimm checkpoint too.
- the original (remote-code) layout: `phimm.formats.original`.

Layout detection and the `Loaded` result live in `phimm.formats.layout` (which the format modules import too);
their names are re-exported here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from adapters import AdapterDataError, load_peft_adapter

from .errors import AdapterError, CheckpointError, UnsafeCheckpointError
from .formats.layout import (FORMAT_VERSION, PHIMM_FILE, PICKLE_SUFFIXES, Loaded, adapter_folders, check_no_pickles,
                             detect_layout)

_PICKLE_SUFFIXES = PICKLE_SUFFIXES


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
    elif torch.device(device).type != "cpu":
        # straight from the memory-mapped files onto the device, tensor by tensor: no copy of the model in host memory
        kwargs["device_map"] = {"": str(device)}
    try:
        hf, info = Phi4MultimodalForCausalLM.from_pretrained(
            str(path), use_safetensors=not allow_pickle, output_loading_info=True, **kwargs
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot load the model weights: {e}") from e
    report_mismatch(path, hf, info)
    if device_map is None:
        hf.to(device)  # a no-op where the weights were loaded onto the device
    hf.eval().requires_grad_(False)
    adapters = {}
    for name, folder in adapter_folders(path, meta).items():
        try:
            # in the model's dtype: the layers use these very tensors (no second copy of every adapter in memory),
            # and `save_pretrained` writes them as it writes the base, in the dtype the model was loaded in
            adapters[name] = load_peft_adapter(folder, name, dtype=dtype if dtype.is_floating_point else None,
                                               read=mapped_tensors)
        except AdapterDataError as e:
            raise AdapterError(str(e)) from e
    return Loaded(hf, adapters, meta, layout)


def mapped_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file as views of memory maps (`MappedShards`): nothing is read until used,
    and a tensor in the wanted dtype stays the file's pages, which a packed copy can give back."""
    from .formats.check import list_tensors
    from .formats.shards import MappedShards

    infos, problems, _ = list_tensors(Path(file).parent)
    infos = {k: i for k, i in infos.items() if Path(i.file) == Path(file)}
    if problems or not infos:
        raise AdapterDataError(f"{file}: cannot read its tensors: {'; '.join(problems) or 'none found'}")
    shards = MappedShards(infos)
    return {k: shards.get(k) for k in infos}


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


__all__ = ["FORMAT_VERSION", "PHIMM_FILE", "AdapterError", "CheckpointError", "Loaded", "UnsafeCheckpointError",
           "adapter_folders", "check_no_pickles", "detect_layout", "load_checkpoint", "report_mismatch"]
