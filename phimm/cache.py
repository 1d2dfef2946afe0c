"""KV caches written in place: one per prefill group, and the running batch's, which rows join and leave.

transformers' `DynamicCache` concatenates at every decode step, copying the whole cache each time (for image
prompts of a thousand tokens that copy costs as much as reading the weights). Each layer here keeps a buffer with
room to grow and hands attention a view of the filled part, so the masks and shapes transformers builds stay those
of a dynamic cache.

The running batch (`BatchCache`) is right-aligned: every row ends at the same column, the one the next decode
step writes, and a row of `n` cached positions fills the last `n` columns; the columns to its left are zeros that
the attention mask hides. A joining row is copied in to end at that column (the others shift right if it is
longer than they are), a leaving row is dropped and the columns no remaining row uses are cut off: one copy of
the cache per join or leave, none per decode step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

GROW = 32  # spare columns allocated beyond what is filled; a full buffer grows by half again


class PreallocatedLayer(DynamicLayer):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.set_buffers(key_states.new_zeros(b, h, self.capacity, d),
                         value_states.new_zeros(b, h, self.capacity, value_states.shape[-1]), 0)

    def set_buffers(self, key_buf: torch.Tensor, value_buf: torch.Tensor, length: int) -> None:
        self.key_buf, self.value_buf = key_buf, value_buf  # [B, H, capacity, D]
        self.dtype, self.device = key_buf.dtype, key_buf.device
        self.capacity = key_buf.shape[2]
        self.length = length
        self.keys = key_buf[:, :, :length]
        self.values = value_buf[:, :, :length]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if end > self.capacity:
            self.grow(end)
        self.key_buf[:, :, self.length:end] = key_states
        self.value_buf[:, :, self.length:end] = value_states
        self.length = end
        self.keys = self.key_buf[:, :, :end]
        self.values = self.value_buf[:, :, :end]
        return self.keys, self.values

    def grow(self, needed: int) -> None:
        """Reallocate with room for `needed` positions and more (the filled part is copied once)."""
        capacity = max(needed, self.capacity + max(GROW, self.capacity // 2))
        k, v = self.key_buf, self.value_buf
        kb = k.new_zeros(k.shape[0], k.shape[1], capacity, k.shape[3])
        vb = v.new_zeros(v.shape[0], v.shape[1], capacity, v.shape[3])
        kb[:, :, :self.length] = k[:, :, :self.length]
        vb[:, :, :self.length] = v[:, :, :self.length]
        self.set_buffers(kb, vb, self.length)

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0


class PreallocatedCache(Cache):
    """`num_layers` preallocated layers of `capacity` positions each (they grow if more are written)."""

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])


class BatchCache(PreallocatedCache):
    """The running batch's cache: rows of different lengths, right-aligned (see the module's docstring).

    `lengths[i]` is how many positions row i has cached; `width` is the filled columns (the longest row). After a
    decode forward wrote one column for every row, `advance()` counts it.
    """

    def __init__(self, num_layers: int):
        super().__init__(num_layers, 0)
        self.lengths: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    @property
    def positions(self) -> int:
        """Cache positions held by the batch's rectangle, padding included (rows x width)."""
        return self.rows * self.width

    @property
    def nbytes(self) -> int:
        """Bytes of the layers' buffers (allocated, filled or not)."""
        return sum(2 * layer.key_buf.numel() * layer.key_buf.element_size() for layer in self.layers
                   if layer.is_initialized)

    def attention_mask(self, new: int = 1, device=None) -> torch.Tensor:
        """`[B, width + new]`: 1 where a row has cached positions, and for the `new` columns about to be written."""
        width = self.width
        lengths = torch.tensor(self.lengths, device=device)
        cols = torch.arange(width + new, device=device)
        return (cols[None, :] >= (width - lengths)[:, None]).long()

    def next_positions(self, device=None) -> torch.Tensor:
        """`[B, 1]` position id of each row's next token."""
        return torch.tensor(self.lengths, dtype=torch.long, device=device)[:, None]

    def advance(self, n: int = 1) -> None:
        self.lengths = [x + n for x in self.lengths]

    def add_rows(self, sources: Sequence[tuple[Cache, int, int, int]]) -> None:
        """Append rows: `sources[j] = (cache, row, start, n)` copies positions `start .. start + n` of row `row`
        of `cache` (a left-padded prefill has `start` > 0)."""
        if not sources:
            return
        old_width, old_rows = self.width, self.rows
        width = max([old_width] + [n for _, _, _, n in sources])
        total = old_rows + len(sources)
        for li, layer in enumerate(self.layers):
            src0 = sources[0][0].layers[li]
            kb, vb = self._relaid(layer, src0.keys, src0.values, total, width, width)
            for j, (cache, row, start, n) in enumerate(sources):
                src = cache.layers[li]
                kb[old_rows + j, :, width - n:width] = src.keys[row, :, start:start + n]
                vb[old_rows + j, :, width - n:width] = src.values[row, :, start:start + n]
            layer.set_buffers(kb, vb, width)
        self.lengths = self.lengths + [n for _, _, _, n in sources]

    def _relaid(self, layer, like_k: torch.Tensor, like_v: torch.Tensor, rows: int, width: int, end: int):
        """New zero buffers (dtype and heads of `like_k` / `like_v`) of `rows` rows and room for `width` columns
        and more, `layer`'s current rows copied in first, right-aligned to end at column `end`."""
        kb = like_k.new_zeros(rows, like_k.shape[1], width + GROW, like_k.shape[3])
        vb = like_v.new_zeros(rows, like_v.shape[1], width + GROW, like_v.shape[3])
        if self.rows:
            kb[:self.rows, :, end - self.width:end] = layer.keys
            vb[:self.rows, :, end - self.width:end] = layer.values
        return kb, vb

    def keep_rows(self, keep: Sequence[int]) -> None:
        """Drop every row not in `keep` (indices, in the order to keep) and the columns no kept row uses."""
        keep = list(keep)
        if keep == list(range(self.rows)):
            return
        old_width = self.width
        self.lengths = [self.lengths[i] for i in keep]
        width = self.width
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            if not keep:  # fresh empty buffers: a view of the old ones would keep their memory
                kb, vb = layer.key_buf, layer.value_buf
                layer.set_buffers(kb.new_empty(0, kb.shape[1], 0, kb.shape[3]),
                                  vb.new_empty(0, vb.shape[1], 0, vb.shape[3]), 0)
                continue
            idx = torch.tensor(keep, device=layer.key_buf.device)
            k = layer.key_buf[:, :, old_width - width:old_width].index_select(0, idx)
            v = layer.value_buf[:, :, old_width - width:old_width].index_select(0, idx)
            kb = k.new_zeros(k.shape[0], k.shape[1], width + GROW, k.shape[3])
            vb = v.new_zeros(v.shape[0], v.shape[1], width + GROW, v.shape[3])
            kb[:, :, :width] = k
            vb[:, :, :width] = v
            layer.set_buffers(kb, vb, width)

    def prepare_step(self, new_lengths: Sequence[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor, int]]]:
        """Make room for one forward that writes a column for every running row and prefills new rows of
        `new_lengths` positions (`phimm.step.MixedStep`): new buffers with the rows appended, the running rows'
        positions right-aligned to end one column before the new right edge (the column their next token takes), the
        new rows' columns empty. Returns the width after that forward and each layer's previous (key, value,
        length), which `restore` puts back. Nothing is counted yet: the caller sets the lengths when the forward
        has written its columns."""
        width = max([self.width + 1] + list(new_lengths))
        total = self.rows + len(new_lengths)
        # every new buffer first: a failure here changes nothing
        made = [self._relaid(layer, layer.key_buf, layer.value_buf, total, width, width - 1) for layer in self.layers]
        before = [(layer.key_buf, layer.value_buf, layer.length) for layer in self.layers]
        for layer, (kb, vb) in zip(self.layers, made):
            layer.set_buffers(kb, vb, layer.length)  # `keys` / `values` stay unread until the lengths are set
        return width, before

    def restore(self, before: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
        """Undo `prepare_step` (its buffers dropped, the previous ones back; the lengths were never changed)."""
        for layer, (k, v, length) in zip(self.layers, before):
            layer.set_buffers(k, v, length)
