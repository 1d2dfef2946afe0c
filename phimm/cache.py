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
TRIM = 0.25  # a running batch's columns no row uses are cut off once they are more than this share of its width


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

    def set_buffers(self, key_buf: torch.Tensor, value_buf: torch.Tensor, length: int, rows: int | None = None):
        """Use `key_buf` / `value_buf` (`[rows or more, H, capacity, D]`), filled up to column `length` in their
        first `rows` rows (None: all of them)."""
        self.key_buf, self.value_buf = key_buf, value_buf
        self.dtype, self.device = key_buf.dtype, key_buf.device
        self.capacity = key_buf.shape[2]
        self.rows = key_buf.shape[0] if rows is None else rows
        self.length = length
        self.keys = key_buf[:self.rows, :, :length]
        self.values = value_buf[:self.rows, :, :length]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if end > self.capacity:
            self.grow(end)
        self.key_buf[:self.rows, :, self.length:end] = key_states
        self.value_buf[:self.rows, :, self.length:end] = value_states
        self.length = end
        self.keys = self.key_buf[:self.rows, :, :end]
        self.values = self.value_buf[:self.rows, :, :end]
        return self.keys, self.values

    def grow(self, needed: int) -> None:
        """Reallocate with room for `needed` positions and more (the filled part is copied once)."""
        capacity = max(needed, self.capacity + max(GROW, self.capacity // 2))
        k, v = self.key_buf, self.value_buf
        kb = k.new_zeros(k.shape[0], k.shape[1], capacity, k.shape[3])
        vb = v.new_zeros(v.shape[0], v.shape[1], capacity, v.shape[3])
        kb[:, :, :self.length] = k[:, :, :self.length]
        vb[:, :, :self.length] = v[:, :, :self.length]
        self.set_buffers(kb, vb, self.length, self.rows)

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0


class PreallocatedCache(Cache):
    """`num_layers` preallocated layers of `capacity` positions each (they grow if more are written)."""

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])


class BatchCache(PreallocatedCache):
    """The running batch's cache: rows of different lengths, right-aligned (see the module's docstring).

    `lengths[i]` is how many positions row i has cached; `width` is the columns the rows span, every row ending at
    the last of them: at least the longest row, more while the columns a longest row left behind are not worth a
    copy to cut off (`TRIM`). After a decode forward wrote one column for every row, `advance()` counts it.

    The buffers keep spare rows and columns (`max_rows`, `budget`: the most rows, and rows x columns, they are
    allocated for), so that most joins and leaves move only the rows concerned: a joining row is written into a
    spare row if it is no longer than the batch's width, a leaving row's place is taken by the rows after it. A
    join that needs more rows or a wider batch lays the buffers out anew (with spare rows when the batch was not
    empty: rows keep joining a running batch).
    """

    in_place = True  # joins and leaves within the buffers when they fit (subclasses with fixed storage: False)

    def __init__(self, num_layers: int, max_rows: int | None = None, budget: int | None = None):
        super().__init__(num_layers, 0)
        self.lengths: list[int] = []
        self.max_rows, self.budget = max_rows, budget
        self._span = 0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self._span

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
        self._span += n

    # ---- the buffers -----------------------------------------------------------------------------------------
    def _capacity_rows(self) -> int:
        layer = self.layers[0]
        return layer.key_buf.shape[0] if layer.is_initialized else 0

    def _capacity_cols(self) -> int:
        layer = self.layers[0]
        return layer.key_buf.shape[2] if layer.is_initialized else 0

    def _fits(self, rows: int, width: int) -> bool:
        """Whether `rows` rows of `width` columns fit the buffers as they are."""
        return self.in_place and rows <= self._capacity_rows() and width <= self._capacity_cols()

    def _alloc_rows(self, rows: int, cols: int) -> int:
        """Rows to allocate for `rows` rows of `cols` columns: spare ones for rows joining later when the batch
        is running already (half as many again, at least 4), within `max_rows` and `budget`."""
        if not self.in_place or not self.rows:
            return rows
        spare = rows + max(4, rows // 2)
        if self.max_rows is not None:
            spare = min(spare, self.max_rows)
        if self.budget is not None:
            spare = min(spare, self.budget // max(cols, 1))
        return max(rows, spare)

    def _views(self, rows: int, width: int) -> None:
        """Every layer's filled views: rows `:rows`, columns `:width`."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.set_buffers(layer.key_buf, layer.value_buf, width, rows)
        self._span = width

    def _relaid(self, layer, like_k: torch.Tensor, like_v: torch.Tensor, rows: int, width: int, end: int):
        """New zero buffers (dtype and heads of `like_k` / `like_v`) of `rows` rows or more and room for `width`
        columns and more, `layer`'s current rows copied in first, right-aligned to end at column `end`."""
        n = self._alloc_rows(rows, width + GROW)
        kb = like_k.new_zeros(n, like_k.shape[1], width + GROW, like_k.shape[3])
        vb = like_v.new_zeros(n, like_v.shape[1], width + GROW, like_v.shape[3])
        if self.rows and layer.is_initialized:
            kb[:self.rows, :, end - self.width:end] = layer.keys
            vb[:self.rows, :, end - self.width:end] = layer.values
        return kb, vb

    # ---- rows join and leave ---------------------------------------------------------------------------------
    def add_rows(self, sources: Sequence[tuple[Cache, int, int, int]]) -> None:
        """Append rows: `sources[j] = (cache, row, start, n)` copies positions `start .. start + n` of row `row`
        of `cache` (a left-padded prefill has `start` > 0)."""
        if not sources:
            return
        old_rows = self.rows
        width = max([self.width] + [n for _, _, _, n in sources])
        total = old_rows + len(sources)
        in_place = self._fits(total, width) and width == self.width
        for li, layer in enumerate(self.layers):
            if in_place:
                kb, vb = layer.key_buf, layer.value_buf
            else:
                src0 = sources[0][0].layers[li]
                kb, vb = self._relaid(layer, src0.keys, src0.values, total, width, width)
            for j, (cache, row, start, n) in enumerate(sources):
                src = cache.layers[li]
                if in_place:  # a spare row: clear what an earlier row left in it
                    kb[old_rows + j, :, :width - n].zero_()
                    vb[old_rows + j, :, :width - n].zero_()
                kb[old_rows + j, :, width - n:width] = src.keys[row, :, start:start + n]
                vb[old_rows + j, :, width - n:width] = src.values[row, :, start:start + n]
            layer.set_buffers(kb, vb, width, total)
        self.lengths = self.lengths + [n for _, _, _, n in sources]
        self._span = width

    def keep_rows(self, keep: Sequence[int]) -> None:
        """Drop every row not in `keep` (indices, in the order to keep). The kept rows move up in place; the
        columns no kept row uses are cut off (a copy of the batch) when they are more than `TRIM` of the width."""
        keep = list(keep)
        if keep == list(range(self.rows)):
            return
        self.lengths = [self.lengths[i] for i in keep]
        width, longest = self.width, max(self.lengths, default=0)
        if not keep:
            for layer in self.layers:  # fresh empty buffers: a view of the old ones would keep their memory
                if layer.is_initialized:
                    kb, vb = layer.key_buf, layer.value_buf
                    layer.set_buffers(kb.new_empty(0, kb.shape[1], 0, kb.shape[3]),
                                      vb.new_empty(0, vb.shape[1], 0, vb.shape[3]), 0)
            self._span = 0
            return
        trim = not self.in_place or width - longest > max(GROW, int(TRIM * width))
        moves = [(i, s) for i, s in enumerate(keep) if i != s]
        if trim:
            idx = None
        elif moves:
            device = self.layers[0].key_buf.device
            dst = torch.tensor([i for i, _ in moves], device=device)
            src = torch.tensor([s for _, s in moves], device=device)
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            if trim:  # new buffers of the kept rows, their unused columns cut off
                if idx is None:
                    idx = torch.tensor(keep, device=layer.key_buf.device)
                k = layer.key_buf[:, :, width - longest:width].index_select(0, idx)
                v = layer.value_buf[:, :, width - longest:width].index_select(0, idx)
                n = self._alloc_rows(len(keep), longest + GROW)
                kb = k.new_zeros(n, k.shape[1], longest + GROW, k.shape[3])
                vb = v.new_zeros(n, v.shape[1], longest + GROW, v.shape[3])
                kb[:len(keep), :, :longest] = k
                vb[:len(keep), :, :longest] = v
                layer.set_buffers(kb, vb, longest, len(keep))
                continue
            if moves:
                for buf in (layer.key_buf, layer.value_buf):
                    filled = buf[:, :, :width]
                    filled.index_copy_(0, dst, filled.index_select(0, src))
            layer.set_buffers(layer.key_buf, layer.value_buf, width, len(keep))
        self._span = longest if trim else width

    # ---- mixed steps (phimm.step.MixedStep) --------------------------------------------------------------------
    def prepare_step(self, new_lengths: Sequence[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor, int]]]:
        """Make room for one forward that writes a column for every running row and prefills new rows of
        `new_lengths` positions (`phimm.step.MixedStep`): the rows appended (in spare rows when they fit, else in
        new buffers), the running rows' positions right-aligned to end one column before the new right edge (the
        column their next token takes), the new rows' columns empty. Returns the width after that forward and
        each layer's previous (key, value, length, rows), which `restore` puts back. Nothing is counted yet:
        `commit_step` counts what the forward wrote."""
        width = max([self.width + 1] + list(new_lengths))
        total = self.rows + len(new_lengths)
        before = [(layer.key_buf, layer.value_buf, layer.length, self.rows) for layer in self.layers]
        if self._fits(total, width) and width == self.width + 1:
            # in place: the running rows' next column and the spare rows are outside every view
            for layer in self.layers:
                for j, n in enumerate(new_lengths):
                    layer.key_buf[self.rows + j, :, :width - n].zero_()
                    layer.value_buf[self.rows + j, :, :width - n].zero_()
            return width, before
        # every new buffer first: a failure here changes nothing
        made = [self._relaid(layer, layer.key_buf, layer.value_buf, total, width, width - 1) for layer in self.layers]
        for layer, (kb, vb) in zip(self.layers, made):
            layer.set_buffers(kb, vb, layer.length, self.rows)  # `keys` / `values` stay unread until committed
        return width, before

    def commit_step(self, width: int, lengths: Sequence[int]) -> None:
        """A mixed step's forward wrote its columns: the batch is now `lengths`, `width` wide."""
        self.lengths = list(lengths)
        self._views(len(self.lengths), width)

    def restore(self, before: Sequence[tuple[torch.Tensor, torch.Tensor, int, int]]) -> None:
        """Undo `prepare_step` (its buffers dropped, the previous ones back; the lengths were never changed)."""
        for layer, (k, v, length, rows) in zip(self.layers, before):
            layer.set_buffers(k, v, length, rows)
