"""A KV cache that is allocated once per batch and written in place, and the merge of per-row prefills into it.

transformers' `DynamicCache` concatenates at every decode step, copying the whole cache each time (for image
prompts of a thousand tokens that copy costs as much as reading the weights). Each layer here keeps a buffer of
`capacity` positions and hands attention a view of the filled part, so the masks and shapes transformers builds
stay those of a dynamic cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.key_buf = torch.zeros(b, h, self.capacity, d, dtype=self.dtype, device=self.device)
        self.value_buf = torch.zeros(b, h, self.capacity, value_states.shape[-1], dtype=self.dtype, device=self.device)
        self.keys = self.key_buf[:, :, :0]
        self.values = self.value_buf[:, :, :0]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} positions asked, {self.capacity} allocated")
        self.key_buf[:, :, self.length:end] = key_states
        self.value_buf[:, :, self.length:end] = value_states
        self.length = end
        self.keys = self.key_buf[:, :, :end]
        self.values = self.value_buf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0


class PreallocatedCache(Cache):
    """`num_layers` preallocated layers of `capacity` positions each."""

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])

    @classmethod
    def from_rows(cls, caches: Sequence[Cache], rows: Sequence[int], lengths: Sequence[int],
                  extra: int) -> "PreallocatedCache":
        """Merge prefilled rows (row `rows[i]` of `caches[i]`, `lengths[i]` positions) into one batch, each row
        left-padded to the longest (the padding is masked out by the attention mask), with room for `extra`
        more positions."""
        longest = max(lengths)
        num_layers = len(caches[0].layers)
        merged = cls(num_layers, longest + extra)
        for li in range(num_layers):
            k0 = caches[0].layers[li].keys
            v0 = caches[0].layers[li].values
            k = torch.zeros((len(caches), k0.shape[1], longest, k0.shape[-1]), dtype=k0.dtype, device=k0.device)
            v = torch.zeros((len(caches), v0.shape[1], longest, v0.shape[-1]), dtype=v0.dtype, device=v0.device)
            for i, (c, r, n) in enumerate(zip(caches, rows, lengths)):
                k[i, :, longest - n:] = c.layers[li].keys[r, :, :n]
                v[i, :, longest - n:] = c.layers[li].values[r, :, :n]
            merged.layers[li].update(k, v)
        return merged
