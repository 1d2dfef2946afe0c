"""Loading the published Phi-4-multimodal checkpoint as Microsoft wrote it (the remote-code, "original" layout).

`load()` builds transformers' `Phi4MultimodalForCausalLM` with its parameters on the `meta` device (no memory),
then assigns every tensor as a view of the memory-mapped shard (no copy when the dtype already matches: the
weights are the file's pages), so loading the 11 GB checkpoint needs about 11 GB, not twice that.

The layout itself (key names, `config.json`, the tensors a config implies) is described in
`phimm.formats.original_keys`, the shards are read by `phimm.formats.shards`, the model is built on `meta` by
`phimm.formats.empty` and spread over devices by `phimm.formats.placement`; their public names are re-exported
here, so `from phimm.formats import original` still gives them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .check import check
from .empty import build_empty
from .layout import Loaded, check_no_pickles, is_original_config
from .original_keys import (DEFAULT_VISION, EOS_TOKEN_IDS, NATIVE_TO_ORIGINAL_RULES, ORIGINAL_TO_NATIVE_RULES,
                            RENAMES, ExpectedTensors, LoraSpec, expected_tensors, lora_specs, lora_target_paths,
                            native_config, native_config_dict, native_to_original_key, original_to_native_key,
                            read_original_config, split_lora_key)
from .placement import dispatch
from .shards import ST_DTYPES, MappedShards


def load(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
         device_map=None, mmap_per_file: bool | None = None) -> Loaded:
    """Load an original-layout checkpoint: `phimm.checkpoint.Loaded(hf_model, {"vision": ..., "speech": ...},
    meta, layout="original")`. The checkpoint is checked first (headers only); weights in `dtype` that are
    already in `dtype` in the file are used in place (memory-mapped), the others converted one by one.
    `mmap_per_file`: one memory map per shard file instead of one per tensor (`MappedShards`' `per_file`; None:
    from the environment variable `PHIMM_MMAP_PER_FILE`)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    check_no_pickles(path, allow_pickle=False)
    original = read_original_config(path)
    config = native_config(original, dtype)
    model = build_empty(config, dtype)
    report = check(path, model=model)  # raises CheckpointError naming what does not fit
    expected = report.expected

    shards = MappedShards(report.tensors, per_file=mmap_per_file)
    # on an accelerator (and no device_map), each tensor goes from its memory-mapped file straight to the device and
    # is converted there: the host never holds a copy of the model
    target = torch.device(device) if device_map is None and torch.device(device).type != "cpu" else None
    state: dict[str, torch.Tensor] = {}
    lora_state: dict[str, torch.Tensor] = {}
    for key in report.tensors:
        if split_lora_key(key) is not None:
            lora_state[key] = shards.get(key)  # kept as stored: A / B for the adapters
            continue
        t = shards.get(key)
        if target is not None:
            t = t.to(target)
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
        model = dispatch(model, device_map, dtype)
    elif torch.device(device).type != "cpu":
        model.to(device)
    meta = {"source_layout": "original",
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


__all__ = [
    "ORIGINAL_TO_NATIVE_RULES", "NATIVE_TO_ORIGINAL_RULES", "RENAMES", "LoraSpec", "ExpectedTensors", "MappedShards",
    "ST_DTYPES", "original_to_native_key", "native_to_original_key", "split_lora_key", "native_config",
    "native_config_dict", "lora_specs", "lora_target_paths", "build_empty", "expected_tensors",
    "read_original_config", "is_original_config", "load", "DEFAULT_VISION", "EOS_TOKEN_IDS",
]
