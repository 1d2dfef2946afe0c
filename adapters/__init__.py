"""phimm's LoRA adapters as data: load from peft folders or combined checkpoints, validate against the base,
attach to the frozen base with per-row selection, merge, save."""

__phimm__ = True  # marks this package as phimm's own (a different PyPI project is also named `adapters`)

from .errors import AdapterDataError
from .lora import (NO_ADAPTER, LoraAdapter, LoraLinear, RowAdapters, active_rows, find_targets, merged_weight,
                   unwrap_targets, wrap_targets)
from .peft_io import adapter_from_state_dict, load_peft_adapter, save_peft_adapter

__all__ = [
    "AdapterDataError",
    "NO_ADAPTER",
    "active_rows",
    "LoraAdapter",
    "LoraLinear",
    "RowAdapters",
    "find_targets",
    "merged_weight",
    "wrap_targets",
    "unwrap_targets",
    "adapter_from_state_dict",
    "load_peft_adapter",
    "save_peft_adapter",
]
