"""transformers' `Phi4MultimodalForCausalLM` built on the `meta` device (no memory, no init): what the checks
compare a checkpoint's headers with, and what the original-layout loader assigns memory-mapped tensors into."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping

import torch
from torch import nn


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


def tied_keys(model: nn.Module) -> list[str]:
    """The state-dict keys a checkpoint does not store because they are tied to another weight (`lm_head.weight`
    when the config ties word embeddings); empty when nothing is tied."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return []
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return list(tied.keys() if isinstance(tied, Mapping) else tied)


__all__ = ["build_empty", "tied_keys"]
