"""LoRA adapters as data, and the linear layer that applies a different one to each batch row."""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import AdapterDataError

# with an adapter format (`LoraLinear.set_adapter_format`), forwards of up to this many tokens run B through it
# and add its output; longer ones (prefills) add B's product into the base output in place, inside B's GEMM
# (`addmm_`, B as a plain tensor: `dense()`, a transient copy out of a packed format, the factor itself
# otherwise). 209m gate_up (1024 -> 7168, r = 64, bf16, one core) over 3,420 tokens: the base GEMM 36.8 ms; with
# B through its format and a separate add 58.3 ms, with B's format adding the base output as a post-op (oneDNN's
# binary add) 55.4 ms, in place 41.7 ms. At 1 token, B through its format and a separate add is 10-20 us faster
# than `addmm_`
FORMATTED_B_MAX_TOKENS = 32
# in a forward whose rows are on different adapters, a run of consecutive rows on one adapter that holds at least
# this many tokens (a row of a prefill bucket; a joining prompt of a mixed step, one row per token) gets its
# adapter applied to its rows alone (`RowAdapters.parts`), as a forward on that adapter would, instead of every
# adapter's ranks applied to every row with the others masked off
RUN_MIN_TOKENS = 64


@dataclass
class LoraAdapter:
    """One named adapter: for each target module path of the base model, A `[r, in]` and B `[out, r]`.

    The delta added to a target's output is `B @ A @ x * alpha / r`.
    """

    name: str
    r: int
    alpha: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dropout: float = 0.0
    target_modules: str | list[str] | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def validate(self, modules: Mapping[str, nn.Linear]) -> None:
        """Check that every target exists in `modules` and every A/B fits it (shapes, rank)."""
        problems = []
        unknown = sorted(set(self.weights) - set(modules))
        if unknown:
            problems.append(f"{len(unknown)} target(s) not in the base model, e.g. {unknown[:3]}")
        for path, (a, b) in sorted(self.weights.items()):
            lin = modules.get(path)
            if lin is None:
                continue
            want_a = (self.r, lin.in_features)
            want_b = (lin.out_features, self.r)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                problems.append(
                    f"{path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, expected {want_a} / {want_b}"
                    f" (rank {self.r})"
                )
        if problems:
            shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
            raise AdapterDataError(f"adapter {self.name!r} does not fit the base model: {shown}")

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "LoraAdapter":
        w = {k: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)) for k, (a, b) in self.weights.items()}
        return LoraAdapter(self.name, self.r, self.alpha, w, self.dropout, self.target_modules)


_ACTIVE: ContextVar["RowAdapters"] = ContextVar("phimm_row_adapters")


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each row of one forward uses: a value made for that forward and passed with it.

    - `uniform`: the adapter index every row uses (None: rows differ, or no adapter at all);
    - `rank_mask`: for a mixed batch, `[B, sum of ranks]` holding the row's adapter's scale where its ranks sit,
      zeros elsewhere: every adapter's A is applied to every row in one matmul, the mask keeps each row's own;
    - `ranks`: every adapter's rank, in index order (the layout of `rank_mask`);
    - `runs`: for a mixed batch, `(start, end, adapter)` for each run of consecutive rows on one adapter (None:
      the base alone), in order (`parts`).

    A model's forward takes one and makes it active for its own duration (`with rows.active(): ...`):
    transformers' decoder layers pass no extra arguments down to their linear layers, so the value reaches each
    `LoraLinear` through a context variable scoped to that forward. Layers hold no per-call state, and two
    threads can run forwards on different rows at once.
    """

    uniform: int | None = None
    rank_mask: torch.Tensor | None = None
    ranks: tuple[int, ...] = ()
    runs: tuple[tuple[int, int, int | None], ...] = ()
    # `parts` made per tokens-per-row (and `RUN_MIN_TOKENS`): a forward's layers all ask with the same value
    _parts: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def for_rows(cls, row_adapter: Sequence[int | None], ranks: Sequence[int], scales: Sequence[float],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "RowAdapters":
        """`row_adapter[i]` is the adapter index of row i, or None for the base model alone; `ranks[a]` and
        `scales[a]` are adapter a's rank and alpha / r."""
        present = set(row_adapter)
        if present <= {None}:
            return NO_ADAPTER
        if len(present) == 1:
            return cls(uniform=next(iter(present)), ranks=tuple(ranks))
        table = _mask_table(tuple(ranks), tuple(float(s) for s in scales), dtype, torch.device(device))
        none = len(ranks)  # the table's last row: zeros, for rows on the base alone
        idx = torch.tensor([none if a is None else a for a in row_adapter], device=table.device)
        runs, start = [], 0
        for a, group in itertools.groupby(row_adapter):
            n = sum(1 for _ in group)
            runs.append((start, start + n, a))
            start += n
        return cls(rank_mask=table.index_select(0, idx), ranks=tuple(ranks), runs=tuple(runs))

    def parts(self, tokens_per_row: int) -> list[tuple[int, int, "RowAdapters"]] | None:
        """A mixed batch split along its rows, for rows of `tokens_per_row` tokens each: every run of rows on one
        adapter holding at least `RUN_MIN_TOKENS` tokens its own uniform part, the rows between such runs masked
        parts (`rank_mask`'s rows); consecutive `(start, end, RowAdapters)` covering all rows. None when no run
        is that long (the whole batch masked)."""
        key = (tokens_per_row, RUN_MIN_TOKENS)
        if key not in self._parts:
            self._parts[key] = self._make_parts(tokens_per_row)
        return self._parts[key]

    def _make_parts(self, tokens_per_row: int) -> list[tuple[int, int, "RowAdapters"]] | None:
        if self.rank_mask is None or not any((e - s) * tokens_per_row >= RUN_MIN_TOKENS for s, e, _ in self.runs):
            return None
        out, pending = [], None  # pending: the first row of a stretch of short runs
        for s, e, a in self.runs:
            if (e - s) * tokens_per_row >= RUN_MIN_TOKENS:
                if pending is not None:
                    out.append((pending, s, RowAdapters(rank_mask=self.rank_mask[pending:s], ranks=self.ranks)))
                    pending = None
                out.append((s, e, NO_ADAPTER if a is None else RowAdapters(uniform=a, ranks=self.ranks)))
            elif pending is None:
                pending = s
        if pending is not None:
            out.append((pending, self.runs[-1][1], RowAdapters(rank_mask=self.rank_mask[pending:], ranks=self.ranks)))
        return out

    @property
    def is_base(self) -> bool:
        return self.uniform is None and self.rank_mask is None

    @contextmanager
    def active(self) -> Iterator["RowAdapters"]:
        """Make this the rows' adapters of every `LoraLinear` forward run inside the block (this thread only)."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


NO_ADAPTER = RowAdapters()  # every row on the base model alone


@functools.lru_cache(maxsize=64)
def _mask_table(ranks: tuple[int, ...], scales: tuple[float, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """`[adapters + 1, sum of ranks]`: row a holds adapter a's scale where its ranks sit, the last row zeros;
    a mixed batch's `rank_mask` is its rows gathered (one per row of the batch, or per token of a mixed step)."""
    table = torch.zeros(len(ranks) + 1, sum(ranks), dtype=dtype, device=device)
    start = 0
    for a, r in enumerate(ranks):
        table[a, start:start + r] = scales[a]
        start += r
    return table


def active_rows() -> RowAdapters:
    """The rows' adapters of the forward running in this context (the base model alone outside any)."""
    return _ACTIVE.get(NO_ADAPTER)


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` plus any number of LoRA adapters, each row of a batch with its own (or none). The same
    layer serves inference and training (`add_trainable`).

    Keeps the base layer's parameter names (`weight`, `bias`), so the module tree's state dict is unchanged.
    Adapters are kept in the compute dtype; the scale is applied inside the GEMM. A batch on one adapter runs
    `x A^T B^T` directly; a mixed batch runs all adapters' A (stacked) in one matmul, masks each row to its own
    adapter's ranks and applies the stacked B: no Python loop over adapters. Rows without an adapter get exactly
    the base output, so text routes stay bit-identical with and without adapters loaded.

    The base weight may live in another format (re-laid out, quantized: `set_base_format`): any callable
    `fmt(x) -> x W^T + b` with an `nbytes` attribute. This module only calls it; it knows no kernel library.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.base_format = None  # a stand-in for `weight` in another format, or None for the plain weight
        self.compute_dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
        self._device = base.weight.device
        self.lora_a: list[torch.Tensor | None] = []  # per adapter index: [r, in]
        self.lora_b: list[torch.Tensor | None] = []  # per adapter index: [out, r]
        self.lora_scale: list[float] = []
        self.trainable: int | None = None  # index of the adapter held as parameters (`lora_A`, `lora_B`)
        self._stacked: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None  # (ranks, A, B)
        # a format for the adapters' own A and B (`set_adapter_format`), and each adapter's pair in it
        self.adapter_format = None
        self._formatted: dict[int, tuple] = {}

    def set_adapter_weights(self, index: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        while len(self.lora_a) <= index:
            self.lora_a.append(None)
            self.lora_b.append(None)
            self.lora_scale.append(1.0)
        self._stacked = None
        self._formatted.pop(index, None)
        if a is None:
            self.lora_a[index] = self.lora_b[index] = None
            return
        dt, dev = self.lora_dtype, self.lora_device
        # no copy when the adapter is already in the compute dtype: the scale is applied inside the GEMM
        self.lora_a[index] = a.detach().to(device=dev, dtype=dt).contiguous()
        self.lora_b[index] = b.detach().to(device=dev, dtype=dt).contiguous()
        self.lora_scale[index] = float(scale)

    def add_trainable(self, r: int, alpha: float) -> int:
        """Add an adapter to train, initialised as peft does (A random, B zero, so it starts as the base), held
        as the parameters `lora_A` `[r, in]` and `lora_B` `[out, r]` in the default dtype; returns its index.
        Forwards apply it where the rows' adapters say so (`RowAdapters(uniform=index)` for every row)."""
        if self.trainable is not None:
            raise ValueError("this layer already has a trainable adapter")
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features) / math.sqrt(self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r))
        index = len(self.lora_a)
        self.lora_a.append(self.lora_A)
        self.lora_b.append(self.lora_B)
        self.lora_scale.append(alpha / r)
        self.trainable = index
        self._stacked = None
        return index

    def stacked(self, ranks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """All adapters' A `[sum r, in]` and B `[out, sum r]` side by side (zeros for adapters not targeting
        this module), adapter i taking `ranks[i]` ranks."""
        ranks = tuple(ranks)
        if self._stacked is None or self._stacked[0] != ranks:
            dt, dev = self.lora_dtype, self.lora_device
            a_parts, b_parts = [], []
            for i, r in enumerate(ranks):
                a = self.lora_a[i] if i < len(self.lora_a) else None
                b = self.lora_b[i] if i < len(self.lora_b) else None
                a_parts.append(a if a is not None else torch.zeros(r, self.in_features, dtype=dt, device=dev))
                b_parts.append(b if b is not None else torch.zeros(self.out_features, r, dtype=dt, device=dev))
            self._stacked = (ranks, torch.cat(a_parts).contiguous(), torch.cat(b_parts, dim=1).contiguous())
        return self._stacked[1], self._stacked[2]

    @property
    def lora_dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def lora_device(self) -> torch.device:
        return self.weight.device if self.weight is not None else self._device

    def set_base_format(self, fmt) -> None:
        """Run the base through `fmt` (callable `x -> x W^T + b`, made from this layer's weight and bias) instead
        of the plain weight, which this layer then drops (no second copy); adapters stay as they are."""
        self.base_format = fmt
        self.weight = None

    def set_adapter_format(self, fmt) -> None:
        """Run a batch on one adapter through `fmt(A)` and `fmt(B)` (a callable made from a weight, as the base's:
        `fmt(w)(x) -> x w^T`), made on that adapter's first such forward; None: plain matmuls. Mixed batches
        and the trainable adapter keep the plain matmuls."""
        self.adapter_format = fmt
        self._formatted = {}

    def _adapter_pair(self, i: int):
        pair = self._formatted.get(i)
        if pair is None:
            pair = self._formatted[i] = (self.adapter_format(self.lora_a[i]), self.adapter_format(self.lora_b[i]))
        return pair

    @property
    def base_nbytes(self) -> int:
        """Bytes of the base weight as a forward reads it (in its format)."""
        if self.base_format is not None:
            return int(self.base_format.nbytes)
        return self.weight.numel() * self.weight.element_size()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.weight is not None and self.weight.is_floating_point():
            self.compute_dtype = self.weight.dtype
            self._device = self.weight.device
        self.lora_a = [None if t is None else fn(t) for t in self.lora_a]
        self.lora_b = [None if t is None else fn(t) for t in self.lora_b]
        if self.trainable is not None:  # the parameters were converted in place of the list's entries
            self.lora_a[self.trainable], self.lora_b[self.trainable] = self.lora_A, self.lora_B
        self._stacked = None
        self._formatted = {}
        return out

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_format is not None:
            return self.base_format(x)
        return nn.functional.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor, rows: RowAdapters | None = None) -> torch.Tensor:
        """`rows`: the rows' adapters (default: those of the forward this layer runs in, `active_rows()`)."""
        out = self.base_forward(x)
        rows = active_rows() if rows is None else rows
        parts = None
        if (rows.rank_mask is not None and self.trainable is None and not out.requires_grad
                and x.shape[0] == rows.rank_mask.shape[0]):  # (in-place writes into views: no autograd here)
            parts = rows.parts(x[0].numel() // self.in_features)
        if parts is not None:
            # each part's rows on their own: views of x and out along the rows, the deltas added in place
            for start, end, part in parts:
                if not part.is_base:
                    self._add_delta(x[start:end], out[start:end], part)
            return out
        return self._add_delta(x, out, rows)

    def _add_delta(self, x: torch.Tensor, out: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """`out` (the base's output for `x`) plus the rows' adapter deltas, added in place (but for a trainable
        adapter's, out of place so that gradients flow), returned."""
        if rows.uniform is not None:
            i = rows.uniform
            if i < len(self.lora_a) and self.lora_a[i] is not None:
                a, b = self.lora_a[i], self.lora_b[i]
                if i == self.trainable:  # training: out of place, so gradients flow (the same ops with or without)
                    return out + (x @ a.t()) @ b.t() * self.lora_scale[i]
                if self.adapter_format is not None and x.dtype == self.lora_dtype:
                    fa, fb = self._adapter_pair(i)
                    dense = getattr(fb, "dense", None)
                    if dense is not None and x.numel() > FORMATTED_B_MAX_TOKENS * self.in_features:
                        # many tokens (a prefill): B's product added into the base output in place
                        h = fa(x)
                        out.view(-1, self.out_features).addmm_(h.reshape(-1, h.shape[-1]), dense().t(),
                                                               alpha=self.lora_scale[i])
                        return out
                    lora_into = getattr(fa, "lora_into", None)  # both products and the add in one call
                    if lora_into is not None and lora_into(x, fb, out, self.lora_scale[i]):
                        return out
                    return out.add_(fb(fa(x)), alpha=self.lora_scale[i])
                h = nn.functional.linear(x, a)  # [..., r]
                # accumulate scale * B h into the base output inside the GEMM: no separate pass over the output
                out.view(-1, self.out_features).addmm_(h.reshape(-1, h.shape[-1]), b.t(), alpha=self.lora_scale[i])
        elif rows.rank_mask is not None:
            a, b = self.stacked(rows.ranks)
            h = nn.functional.linear(x, a)  # [B, T, sum r]
            mask = rows.rank_mask.to(h.dtype)  # each row's own ranks, times its adapter's scale
            h.mul_(mask.view(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1]))  # [B, (T,) sum r]
            out.view(-1, self.out_features).addmm_(h.reshape(-1, h.shape[-1]), b.t())
        return out

    def extra_repr(self) -> str:
        n = sum(t is not None for t in self.lora_a)
        fmt = f", base={type(self.base_format).__name__}" if self.base_format is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={n}{fmt}"


def find_targets(model: nn.Module, targets: str | Iterable[str]) -> dict[str, nn.Module]:
    """The linear modules whose path matches `targets`, as peft matches `target_modules`: a string is a regex
    that must match the whole path; a list names module suffixes (`["qkv_proj", "o_proj"]`)."""
    if isinstance(targets, str):
        ok = lambda p: re.fullmatch(targets, p) is not None  # noqa: E731
    else:
        names = tuple(targets)
        ok = lambda p: any(p == n or p.endswith("." + n) for n in names)  # noqa: E731
    return {p: m for p, m in model.named_modules() if isinstance(m, (nn.Linear, LoraLinear)) and ok(p)}


def wrap_targets(model: nn.Module, paths: Iterable[str]) -> dict[str, LoraLinear]:
    """Replace each `nn.Linear` at `paths` by a `LoraLinear` sharing its weights (idempotent)."""
    out = {}
    for path in paths:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        mod = getattr(parent, attr)
        if not isinstance(mod, LoraLinear):
            mod = LoraLinear(mod)
            setattr(parent, attr, mod)
        out[path] = mod
    return out


def unwrap_targets(model: nn.Module, paths: Iterable[str]) -> None:
    """Put a plain `nn.Linear` (the same weight and bias) back in place of each `LoraLinear` at `paths`."""
    for path in paths:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        mod = getattr(parent, attr)
        if isinstance(mod, LoraLinear):
            if mod.weight is None:
                raise ValueError(f"{path}: the base weight is in another format and cannot be unwrapped")
            plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            plain.weight, plain.bias = mod.weight, mod.bias
            setattr(parent, attr, plain)


def merged_weight(base: torch.Tensor, adapter: LoraAdapter, path: str) -> torch.Tensor:
    """`W0 + B @ A * scale` for one target, computed in fp32."""
    a, b = adapter.weights[path]
    return (base.float() + (b.float() @ a.float()) * adapter.scale).to(base.dtype)
