"""CUDA graphs for the engine's decode step: one replay per step instead of hundreds of kernel launches.

On a GPU an eager decode step of a 32-layer decoder is launch-bound: the weights take under 2 ms to read, the
Python and launch overhead of ~700 kernels takes ten times that. A captured graph replays them all at once. A
graph fixes every shape and every address, so the decode step is made static:

- **Static KV cache** (`StaticBatchCache`): the running batch's cache lives in fixed storage per layer,
  `[rows, kv_heads, columns, head_dim]`, with `rows` the engine's `max_running` (fewer when that much would pass
  the KV budget) and `columns` a multiple of `COLUMNS`. It keeps `BatchCache`'s layout (right-aligned rows:
  every row ends at the column the next step writes) and its join / leave code; rows and columns are written
  into the same storage, which is reallocated only when the batch outgrows it.
- **Graph inputs**: each row's token, its cached length and the column to write travel in one small integer
  buffer; the rotary cos / sin are computed before the replay (transformers' long-context rope chooses its
  frequencies by the largest position) and copied into static buffers. The attention mask is computed inside
  the graph from the lengths, over the whole column range: columns beyond a row's span are masked out.
- **Per-row adapters as graph inputs**: a mixed batch's graph runs every adapter's A and B on every row and
  masks each row to its own adapter's ranks (`RowAdapters.rank_mask`, copied into a static buffer): which row
  takes which adapter is data, so one graph serves every mix. A batch on one adapter, or on none, has a graph of
  its own that reads only that adapter (or none).
- **Buckets**: rows are padded to a power of two (padding rows attend only to their own new column; their
  outputs are dropped), so a handful of graphs per column size covers every batch. Graphs are captured on first
  use and kept until the storage is reallocated.

Turn it off with `PHIMM_CUDA_GRAPHS=0` (the engine then runs the same cache eagerly).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from adapters import NO_ADAPTER, RowAdapters

from .cache import BatchCache, PreallocatedLayer

log = logging.getLogger("phimm.graphs")

COLUMNS = 256  # the static cache's column count is a multiple of this


def enabled(device: torch.device) -> bool:
    """Whether the engine decodes through `GraphDecoder`: on CUDA unless `PHIMM_CUDA_GRAPHS=0`; on any device
    with `PHIMM_CUDA_GRAPHS=static` (the same static step run eagerly, without capture: how the CPU tests check
    it)."""
    flag = os.environ.get("PHIMM_CUDA_GRAPHS", "1")
    return flag == "static" or (device.type == "cuda" and flag != "0")


# decoders whose forward is the plain stack the static step replays (embeddings as looked up, every layer with
# full attention, the final norm); others (Gemma's scaled embeddings, sliding windows) decode eagerly
SUPPORTED_DECODERS = ("phi4_multimodal", "llama", "qwen2", "phi3", "mistral")


def supports(model) -> bool:
    cfg = model.config
    return getattr(cfg, "model_type", None) in SUPPORTED_DECODERS and not getattr(cfg, "sliding_window", None)


def row_bucket(n: int, cap: int) -> int:
    """The padded row count of a batch of `n` rows: the next power of two, at most `cap` (and at least `n`)."""
    b = 1
    while b < n:
        b *= 2
    return max(n, min(b, cap))


def round_columns(n: int) -> int:
    return -(-n // COLUMNS) * COLUMNS


class StaticLayer(PreallocatedLayer):
    """One layer of a `StaticBatchCache`: `key_buf` / `value_buf` are views of rows `[:rows]` of fixed storage."""

    def __init__(self, owner: "StaticBatchCache"):
        super().__init__(0)
        self.owner = owner
        self.storage_k: torch.Tensor | None = None
        self.storage_v: torch.Tensor | None = None

    def _ensure_storage(self, like: torch.Tensor, like_v: torch.Tensor) -> None:
        r, c = self.owner.storage_rows, self.owner.storage_cols
        if self.storage_k is not None and self.storage_k.shape[0] == r and self.storage_k.shape[2] == c:
            return
        # zeros, never uninitialised memory: masked columns are still read, and NaN * 0 is NaN
        self.storage_k = like.new_zeros(r, like.shape[1], c, like.shape[3])
        self.storage_v = like_v.new_zeros(r, like_v.shape[1], c, like_v.shape[3])

    def set_buffers(self, key_buf: torch.Tensor, value_buf: torch.Tensor, length: int, rows: int | None = None):
        """Take rows `key_buf` (`[rows, H, >= length, D]`, filled up to `length`; never a view of the storage
        itself) into the storage, reallocated first if the cache planned another size."""
        if rows is not None and rows != key_buf.shape[0]:
            raise ValueError("a static batch cache takes whole buffers, not some of their rows")
        rows = key_buf.shape[0]
        self._ensure_storage(key_buf, value_buf)
        if rows and length:
            self.storage_k[:rows, :, :length].copy_(key_buf[:, :, :length])
            self.storage_v[:rows, :, :length].copy_(value_buf[:, :, :length])
        self._views(rows, length)

    def _views(self, rows: int, length: int) -> None:
        self.key_buf, self.value_buf = self.storage_k[:rows], self.storage_v[:rows]
        self.dtype, self.device = self.storage_k.dtype, self.storage_k.device
        self.capacity = self.storage_k.shape[2]
        self.length, self.rows = length, rows
        self.keys = self.key_buf[:, :, :length]
        self.values = self.value_buf[:, :, :length]
        self.is_initialized = True

    def grow(self, needed: int) -> None:
        self.owner.plan(self.key_buf.shape[0], needed)
        self.set_buffers(self.keys.clone(), self.values.clone(), self.length)

    def written(self, n: int = 1) -> None:
        """`n` columns were written for every row (by a graph replay)."""
        self._views(self.key_buf.shape[0], self.length + n)

    @property
    def nbytes(self) -> int:
        if self.storage_k is None:
            return 0
        return 2 * self.storage_k.numel() * self.storage_k.element_size()


class StaticBatchCache(BatchCache):
    """`BatchCache` in fixed storage (see the module's docstring): what decode graphs read and write."""

    in_place = False  # every join and leave lays the rows out anew, then into the storage (`StaticLayer`)

    def __init__(self, num_layers: int, max_rows: int, budget_positions: int):
        super().__init__(num_layers)
        self.layers = [StaticLayer(self) for _ in range(num_layers)]
        self.max_rows = max_rows
        self.budget = budget_positions
        self.storage_rows = 0
        self.storage_cols = 0
        self.version = 0  # bumped whenever the storage is reallocated: graphs of older versions are stale

    def plan(self, rows: int, width: int) -> None:
        """Choose the storage for `rows` rows of `width` filled columns plus the one the next step writes."""
        cols = round_columns(width + 1)
        r = self.max_rows if self.max_rows * cols <= self.budget else row_bucket(rows, self.max_rows)
        r = max(r, rows)
        fits = self.storage_rows >= rows and self.storage_cols >= cols
        # kept when the batch shrinks (no reallocation, no new graphs), unless it holds more than the KV budget
        too_big = self.storage_rows * self.storage_cols > max(self.budget, r * cols)
        if fits and not too_big:
            return
        if not too_big and cols > self.storage_cols:  # growing: by half again at least, fewer reallocations
            cols = max(cols, min(round_columns(self.storage_cols * 3 // 2), self.budget // max(r, 1) // COLUMNS
                                 * COLUMNS))
        self.storage_rows, self.storage_cols = r, cols
        self.version += 1

    def add_rows(self, sources) -> None:
        if not sources:
            return
        width = max([self.width] + [n for _, _, _, n in sources])
        self.plan(self.rows + len(sources), width)
        super().add_rows(sources)

    def keep_rows(self, keep: Sequence[int]) -> None:
        keep = list(keep)
        if keep == list(range(self.rows)):
            return
        self.plan(len(keep), max((self.lengths[i] for i in keep), default=0))
        super().keep_rows(keep)

    def reserve(self) -> None:
        """Make room for the column the next decode step writes (reallocating the storage if it is full)."""
        if self.layers[0].is_initialized and self.width + 1 > self.storage_cols:
            self.plan(self.rows, self.width)
            for layer in self.layers:
                layer.set_buffers(layer.keys.clone(), layer.values.clone(), layer.length)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


class _GraphCache:
    """What the decoder layers see as their cache inside a graph: writes the new column in place (`index_copy_`
    at a column held in device memory) and returns the whole static range."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], column: torch.Tensor):
        self.keys, self.values, self.column = keys, values, column

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.column, key_states)
        v.index_copy_(2, self.column, value_states)
        return k, v


class GraphDecoder:
    """Runs the engine's decode steps as CUDA graph replays (see the module's docstring)."""

    def __init__(self, model, capture: bool | None = None):
        self.model = model
        self.cache_kwarg = model.cache_kwarg
        self.device = model.device
        # capture=False runs the static step eagerly (any device): the graphs' inputs and masks, testable on a CPU
        self.capture = (self.device.type == "cuda") if capture is None else capture
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.version = None
        self.captures = 0
        self.replays = 0
        self.capture_error: str | None = None
        self._inputs_rows = 0

    def _inputs(self, rows: int, cols: int) -> None:
        """Static input buffers for up to `rows` rows (reallocated, and the graphs dropped, when more are needed)."""
        if rows <= self._inputs_rows and self.columns.shape[0] >= cols:
            return
        rows = max(rows, self._inputs_rows)
        dev = self.device
        self._drop_graphs()
        self._inputs_rows = rows
        self.ints = torch.zeros(2 * rows + 1, dtype=torch.long, device=dev)  # tokens | lengths | column
        self.ints_host = torch.zeros(2 * rows + 1, dtype=torch.long)
        if dev.type == "cuda":
            self.ints_host = self.ints_host.pin_memory()
        self.columns = torch.arange(max(cols, COLUMNS * 4), device=dev)
        hidden = torch.zeros(1, 1, self.model.config.hidden_size, dtype=self.model.dtype, device=dev)
        cos, sin = self.model.decoder.rotary_emb(hidden, torch.zeros(1, 1, dtype=torch.long, device=dev))
        self.cos = cos.new_zeros(rows, *cos.shape[1:])
        self.sin = sin.new_zeros(rows, *sin.shape[1:])
        self.hidden_probe = hidden
        ranks = sum(a.r for a in self.model.adapter_info.values())
        self.rank_mask = torch.zeros(rows, max(ranks, 1), dtype=self.model.dtype, device=dev)

    def _drop_graphs(self) -> None:
        """Forget every graph (their storage went away). Later captures take a new memory pool: capturing into
        a pool whose graphs were all freed trips an assertion in torch's caching allocator (seen with 2.11)."""
        if self.graphs:
            self.graphs.clear()
            if self.capture:
                torch.cuda.synchronize(self.device)
                self.pool = torch.cuda.graph_pool_handle()

    def _mode(self, rows: RowAdapters):
        if rows.is_base:
            return ("base",)
        if rows.uniform is not None:
            return ("uniform", rows.uniform)
        return ("mixed", rows.ranks)

    def _graph_rows(self, mode, padded: int, ranks) -> RowAdapters:
        if mode[0] == "base":
            return NO_ADAPTER
        if mode[0] == "uniform":
            return RowAdapters(uniform=mode[1], ranks=ranks)
        return RowAdapters(rank_mask=self.rank_mask[:padded, :sum(ranks)], ranks=ranks)

    def _forward(self, cache: StaticBatchCache, padded: int, cols: int, rows: RowAdapters) -> torch.Tensor:
        decoder = self.model.decoder
        r = self._inputs_rows
        tokens = self.ints[:padded].view(padded, 1)
        lengths = self.ints[r:r + padded]
        column = self.ints[2 * r:2 * r + 1]
        span = self.columns[:cols]
        mask = (span[None, :] >= (column - lengths)[:, None]) & (span[None, :] <= column)
        mask = mask[:, None, None, :]  # [B, 1, 1, columns]: the 4-D mask transformers passes to attention as is
        gcache = _GraphCache([layer.storage_k[:padded, :, :cols] for layer in cache.layers],
                             [layer.storage_v[:padded, :, :cols] for layer in cache.layers], column)
        h = decoder.embed_tokens(tokens)
        pos = lengths[:, None]
        emb = (self.cos[:padded], self.sin[:padded])
        with rows.active():
            for layer in decoder.layers:
                out = layer(h, attention_mask=mask, position_ids=pos, use_cache=True, position_embeddings=emb,
                            **{self.cache_kwarg: gcache})
                h = out[0] if isinstance(out, tuple) else out
            h = decoder.norm(h)
            return self.model.logits(h[:, -1], rows)

    def _capture(self, cache, padded, cols, rows) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up off the capture (lazy inits, workspace allocations)
            self._forward(cache, padded, cols, rows)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._forward(cache, padded, cols, rows)
        self.captures += 1
        return graph, out

    def step_uncaptured(self, cache, padded, cols, mode, ranks, n) -> torch.Tensor:
        logits = self._forward(cache, padded, cols, self._graph_rows(mode, padded, ranks))
        for layer in cache.layers:
            layer.written(1)
        return logits[:n]

    @torch.inference_mode()
    def step(self, cache: StaticBatchCache, tokens: Sequence[int], rows: RowAdapters) -> torch.Tensor:
        """One decode step of every running row: returns the logits `[B, V]` (valid until the next step). The
        cache gets one more column for every row."""
        cache.reserve()
        n = cache.rows
        padded = row_bucket(n, cache.storage_rows)
        cols = round_columns(cache.width + 1)  # the columns attention reads: the batch's span, not the storage's
        if cache.version != self.version:
            self._drop_graphs()
            self.version = cache.version
        self._inputs(cache.storage_rows, cols)
        r = self._inputs_rows
        host = self.ints_host
        host.zero_()
        host[:n] = torch.tensor(tokens, dtype=torch.long)
        host[r:r + n] = torch.tensor(cache.lengths, dtype=torch.long)
        host[2 * r] = cache.width
        self.ints.copy_(host, non_blocking=True)
        cos, sin = self.model.decoder.rotary_emb(self.hidden_probe, self.ints[r:r + padded][:, None])
        self.cos[:padded].copy_(cos)
        self.sin[:padded].copy_(sin)
        mode = self._mode(rows)
        if mode[0] == "mixed":
            width = rows.rank_mask.shape[1]
            self.rank_mask[:n, :width].copy_(rows.rank_mask)
            self.rank_mask[n:padded].zero_()
        if not self.capture:
            return self.step_uncaptured(cache, padded, cols, mode, rows.ranks, n)
        key = (padded, cols, mode)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(cache, padded, cols, self._graph_rows(mode, padded, rows.ranks))
            except Exception as e:  # noqa: BLE001 - a model whose step cannot be captured still decodes
                log.warning("cannot capture the decode step in a CUDA graph (%s: %s); decoding without graphs",
                            type(e).__name__, e)
                self.capture_error = f"{type(e).__name__}: {e}"
                self.capture = False
                torch.cuda.synchronize(self.device)
                return self.step_uncaptured(cache, padded, cols, mode, rows.ranks, n)
            self.graphs[key] = entry
        graph, logits = entry
        graph.replay()
        self.replays += 1
        for layer in cache.layers:
            layer.written(1)
        return logits[:n]
