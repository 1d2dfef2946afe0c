"""Placing a loaded model over devices (`device_map=`) with accelerate, as the original-layout loader does after
assigning the memory-mapped weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import CheckpointError

# modules accelerate must keep on one device, besides the model's own `_no_split_modules`
NO_SPLIT_MODULES = ("Phi4MultimodalVisionEncoderLayer", "Phi4MultimodalAudioConformerEncoderLayer",
                    "Phi4MultimodalFeatureEmbedding")


def dispatch(model: nn.Module, device_map, dtype: torch.dtype) -> nn.Module:
    """Place the model over devices with accelerate (`"auto"`, `"balanced"`, `"balanced_low_0"`,
    `"sequential"`, a device, or a dict of module prefix -> device); sets `model.hf_device_map`. Offloading to
    disk is refused."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    no_split += list(NO_SPLIT_MODULES)
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


__all__ = ["NO_SPLIT_MODULES", "dispatch"]
