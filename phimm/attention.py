"""Decode attention for the decoder: a few query positions against a long KV cache, grouped-query attention
without copying keys and values per head.

transformers' sdpa function, for one query position on CPU, calls `scaled_dot_product_attention(...,
enable_gqa=True)` when there is no mask (a batch of one unpadded row: every single request) — and that CPU path
costs ~2 ms per layer at 1,079 cached positions at the 209m bench size and ~6-7 ms at Phi-4-multimodal's width,
5-7x the time to read the keys and values. Here the G query heads that share a KV head are reshaped into the
query-length axis, `[B, Hkv, G * q, D]`, against K and V `[B, Hkv, T, D]` as the cache holds them, with the mask
broadcast (or repeated per head) to match; nothing is copied per head. Two kernels compute that:

- "flash" (the default): `scaled_dot_product_attention` on the packed queries — PyTorch's CPU flash kernel, fp32
  scores and softmax inside, reading K and V in place (transformers does the same for a masked single query).
- "matmul": two batched matmuls with the scaling, softcap, mask and softmax in fp32 between them (bf16 GEMMs
  for long caches; short ones are converted to fp32). It needs K and V contiguous (the cache's views of its
  growing buffers are not), so it copies them once. With K and V warm in cache it is the fastest; in a decode
  step, where the layer's weights have just pushed them out of cache, the copy costs what the GEMMs save: the
  two are within ~10 % (`phimm bench --decode-attention` times both inside decode steps). Used for `softcap`,
  which sdpa lacks.

A decode step's rows are right-aligned in the batch cache (`phimm.cache.BatchCache`): row i sees the last `L_i`
of the `T` columns. When they differ much in length (an image row of a thousand positions beside text rows of
fifty), one call over all `T` columns reads keys and values that the mask then hides. For one query position and
a right-aligned boolean mask, `decode_attention` therefore splits the rows (`split_plan`): one call for every row
over the last `t` columns, then a call of its own, over exactly its `L_i` columns and with no mask, for each row
longer than `t` (its result replaces the first call's). `t` is chosen to read the fewest bytes, each extra call
counted as `SPLIT_CALL_BYTES` more; where no split saves anything, nothing changes.

A prefill of left-padded rows (the engine's prefill buckets) comes with a boolean mask `[B, 1, T, T]`, and sdpa's
CPU kernel, given a mask, computes every query against every key: twice the work of a causal prompt, whose
kernel skips the blocks above the diagonal. When each row of such a mask is causal over the row's own last `L_i`
positions (`padded_prefill_lengths`), `padded_prefill_attention` runs one causal sdpa call per row over exactly
its positions, with no mask (the call a one-row prefill makes), and gives the padded query positions zeros.

`KERNEL = "phimm"` (the default) uses phimm's own CPU kernel (`phimm/kernels/decode_attention.cpp`, built on first
use) for one query position per row, where it takes the call: bf16 or fp32, head dims multiples of 16, no softcap,
and no mask or a boolean one whose rows each see a right-aligned run of columns (each row then reads exactly its
own columns: no split is needed). It reads each KV head's keys and values once, in place, for the G query heads
that share it, fp32 inside (the products of bf16 queries and keys through `vdpbf16ps` where the CPU has it): at
Phi-4-multimodal's width, 1,079 cached positions, K and V from memory, 0.46-0.50 ms per layer against the flash
kernel's ~1.0 ms (`benchmarks/decode_attention.py`). Every other call, or a machine where the kernel cannot be
built, takes "flash".

Other prefills (`q_len > MAX_QUERY_LEN`, or no cached positions before the queries) and anything this path does not
cover (dropout in training, a position bias, a mask it cannot broadcast, non-CPU tensors) go to transformers'
sdpa function unchanged. The mask is transformers' sdpa mask (`sdpa_mask` is registered for the same name):
`None` when nothing is masked, else a boolean `[B, 1 | H, q, T]` (True: attend) or an additive float mask.

`register()` adds the function to transformers' `AttentionInterface` (and the mask to `AttentionMaskInterface`)
as "phimm"; `use_for_decoder(hf_model)` sets it on the decoder's config only (the vision and audio encoders keep
their own). `phimm.model.Phi4MMComposition` does that at load while `ENABLED` is true.
"""

from __future__ import annotations

import threading
import weakref

import torch

from . import step
from .kernels import attention_kernel

NAME = "phimm"
# the switch `Phi4MMComposition.__init__` reads: False leaves the decoder on transformers' sdpa
ENABLED = True
# query positions handled here (with positions cached before them); more is a prefill: sdpa
MAX_QUERY_LEN = 4
# "phimm", "flash" or "matmul" (see the module's docstring)
KERNEL = "phimm"
# "matmul": at most this many cached elements per (row, KV head) (T * head_dim), bf16/fp16 K and V go to fp32
UPCAST_ELEMENTS = 128 * 128
# splitting a decode step's rows by length (`split_plan`): what one more kernel call costs, as K/V bytes read
# (about 20 us at ~13 GB/s); 0 disables the split
SPLIT_CALL_BYTES = 1 << 18
# at most this many rows get a call of their own
SPLIT_MAX_ROWS = 8


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def covers(module, query, key, attention_mask, dropout: float = 0.0, position_bias=None, **kwargs) -> bool:
    """Whether `phimm_attention_forward` computes this call itself (else it hands it to sdpa)."""
    B, H, q, D = query.shape
    T = key.shape[2]
    hkv = key.shape[1]
    if q > MAX_QUERY_LEN or T <= q or H % hkv or key.shape[-1] != D:
        return False
    if attention_mask is None and q > 1:  # only a mask can say which cached positions each query sees
        return False
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] not in (1, H)
                                       or attention_mask.shape[-2:] != (q, T)):
        return False
    return _plain_cpu_call(module, query, dropout, position_bias, kwargs)


def _plain_cpu_call(module, query, dropout, position_bias, kwargs) -> bool:
    """No dropout in training, position bias, attention sinks or returned weights, and CPU tensors: the calls
    this module computes itself."""
    if position_bias is not None or (dropout and module is not None and module.training):
        return False
    if kwargs.get("s_aux") is not None or kwargs.get("output_attentions", False):
        return False
    return query.device.type == "cpu"


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, scaling: float | None = None,
                     softcap: float | None = None, kernel: str | None = None) -> torch.Tensor:
    """Attention of `query [B, H, q, D]` over `key`, `value` `[B, Hkv, T, D]` (H a multiple of Hkv; query head
    `h` reads KV head `h // (H // Hkv)`, as transformers' `repeat_kv`), the last `q` of the `T` positions being
    the queries' own. `attention_mask`: None (every position visible: only with `q == 1`), boolean
    `[B | 1, 1 | H, q, T]` (True: attend) or additive float of that shape. `kernel`: "flash" or "matmul" (default
    `KERNEL`; a softcap takes "matmul"). Returns `[B, q, H, Dv]`, as transformers' attention functions do. A query
    that sees no position gets zeros (as sdpa gives)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    kernel = kernel or KERNEL
    if kernel == "phimm" and softcap is None and query.shape[2] == 1:
        native = attention_kernel()
        if native is not None and native.takes(query, key, value):
            starts = _row_starts(attention_mask, key.shape[0], key.shape[2])
            if starts is not _NOT_ALIGNED:
                return native.decode(query, key, value, starts, scale)
    if softcap is not None or kernel == "matmul":
        def one(q, k, v, m):
            return _matmul_attention(q, k, v, m, scale, softcap)
    else:
        def one(q, k, v, m):
            return _flash_attention(q, k, v, m, scale)
    plan = _plan_for(attention_mask, key, value) if query.shape[2] == 1 else None
    if plan is None:
        return one(query, key, value, attention_mask)
    t, longer = plan
    T = key.shape[2]
    out = one(query, key[:, :, T - t:], value[:, :, T - t:], attention_mask[..., T - t:])
    for i, n in longer:  # each longer row over exactly its own columns: nothing masked
        out[i:i + 1] = one(query[i:i + 1], key[i:i + 1, :, T - n:], value[i:i + 1, :, T - n:], None)
    return out


_NOT_ALIGNED = object()


def _row_starts(mask, batch: int, width: int):
    """For phimm's kernel: None (every column visible), each row's first visible column (int64 [B]) for a boolean
    mask `[B, 1, 1, T]` of right-aligned rows, or `_NOT_ALIGNED` for any other mask."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[:3] != (batch, 1, 1) or mask.shape[3] != width:
        return _NOT_ALIGNED
    lengths = _aligned_lengths(mask)
    return _NOT_ALIGNED if lengths is None else width - lengths


def _aligned_lengths(mask):
    """Each row's visible length (int64 [B]) when every row of a boolean `[B, 1, 1, T]` mask sees a right-aligned
    run of columns, else None; made once per mask object."""
    def make():
        m = mask[:, 0, 0]  # [B, T]
        T = m.shape[-1]
        lengths = m.sum(-1)
        aligned = torch.arange(T, device=m.device)[None, :] >= (T - lengths)[:, None]
        return lengths if torch.equal(m, aligned) else None

    return _once_per_mask("aligned_lengths", mask, make)


def split_plan(lengths: list[int], width: int, column_bytes: int) -> tuple[int, list[tuple[int, int]]] | None:
    """How to split a decode step's attention over right-aligned rows of `lengths` visible columns (of `width`;
    `column_bytes`: K and V bytes of one row's column): `(t, [(row, length), ...])`, one call for all rows over
    the last `t` columns and one per listed row over its own, or None when one call over `width` reads least."""
    if not SPLIT_CALL_BYTES or len(lengths) < 2 or min(lengths) < 1:
        return None
    call = SPLIT_CALL_BYTES / max(1, column_bytes)  # an extra call, in columns
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    B = len(lengths)
    best_cost, best = B * width, None
    extra = 0.0
    for k in range(min(SPLIT_MAX_ROWS, B - 1) + 1):
        t = lengths[order[k]]  # the k longest rows get their own calls; the rest fit in the last t columns
        cost = B * t + extra
        if cost < best_cost:
            best_cost, best = cost, (t, [(i, lengths[i]) for i in order[:k]])
        extra += lengths[order[k]] + call
    return best


_last_mask = threading.local()  # per use: (weak reference to the last mask seen on this thread, what was made of it)


def _once_per_mask(use: str, mask: torch.Tensor, make):
    """`make()` for `mask`, made once while the same mask object comes again (every layer of a forward gets the
    same mask object); the mask itself is not kept alive here (a prefill's is B x T x T booleans)."""
    cache = _last_mask.__dict__
    last = cache.get(use)
    if last is not None and last[0]() is mask:
        return last[1]
    value = make()
    cache[use] = (weakref.ref(mask), value)
    return value


def _plan_for(mask, key, value):
    """`split_plan` for a boolean mask `[B, 1, 1, T]` whose rows each see a right-aligned run of columns (else
    None), made once per mask (every layer of a forward gets the same mask object)."""
    if (mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1
            or mask.shape[0] != key.shape[0] or mask.shape[0] < 2 or not SPLIT_CALL_BYTES):
        return None
    return _once_per_mask("split_plan", mask, lambda: _make_plan(mask, key, value))


def _make_plan(mask, key, value):
    lengths = _aligned_lengths(mask)
    if lengths is None:
        return None
    T = mask.shape[-1]
    column_bytes = key.shape[1] * (key.shape[-1] * key.element_size() + value.shape[-1] * value.element_size())
    return split_plan(lengths.tolist(), T, column_bytes)


def padded_prefill_lengths(mask) -> list[int] | None:
    """For a prefill's boolean mask `[B, 1, T, T]` (True: attend): each row's length `L_i` when every row is
    left-padded and causal over its own positions (query `i >= T - L_i` sees columns `T - L_i .. i`; the padded
    queries' rows are not read), else None. Checked once per mask object (a forward's layers share one)."""
    if (mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1
            or mask.shape[2] != mask.shape[3] or mask.shape[2] <= MAX_QUERY_LEN):
        return None
    return _once_per_mask("padded_prefill", mask, lambda: _prefill_lengths(mask))


def _prefill_lengths(mask) -> list[int] | None:
    m = mask[:, 0]  # [B, T, T]
    T = m.shape[-1]
    lengths = m[:, -1].sum(-1)  # the last query sees all of its row's positions
    idx = torch.arange(T, device=m.device)
    start = (T - lengths)[:, None, None]
    want = (idx[None, None, :] <= idx[None, :, None]) & (idx[None, None, :] >= start)  # causal within the row
    valid = idx[None, :, None] >= start  # the row's own query positions
    return [int(n) for n in lengths.tolist()] if bool(torch.where(valid, m == want, True).all()) else None


def padded_prefill_attention(module, query, key, value, lengths: list[int], scaling: float | None = None,
                             **kwargs) -> torch.Tensor:
    """Attention of a prefill of left-padded rows (`padded_prefill_lengths`): `query [B, H, T, D]`, `key` /
    `value` `[B, Hkv, T, D]`; one causal sdpa call per row over its own last `lengths[i]` positions. Returns
    `[B, T, H, Dv]`, zeros at the padded query positions."""
    B, H, T, _ = query.shape
    out = query.new_zeros(B, T, H, value.shape[-1])
    sdpa = _sdpa()
    for i, n in enumerate(lengths):
        if n:
            o = sdpa(module, query[i:i + 1, :, T - n:], key[i:i + 1, :, T - n:], value[i:i + 1, :, T - n:], None,
                     scaling=scaling, is_causal=True, **kwargs)[0]  # [1, n, H, Dv]
            out[i, T - n:] = o[0]
    return out


def _flash_attention(query, key, value, attention_mask, scale: float) -> torch.Tensor:
    B, H, q, D = query.shape
    hkv, T, dv = key.shape[1], key.shape[2], value.shape[-1]
    G = H // hkv
    packed = query.reshape(B, hkv, G * q, D)  # row g * q + i: query head kv * G + g at position i
    mask = attention_mask
    if mask is not None:
        mb = mask.shape[0]
        if mask.shape[1] != 1:  # per query head: [mb, H, q, T] is [mb, Hkv, G * q, T] row for row
            mask = mask.reshape(mb, hkv, G * q, T)
        elif q > 1:  # one mask for all heads: each of the G rows of a position gets that position's mask
            mask = mask[:, :, None].expand(mb, 1, G, q, T).reshape(mb, 1, G * q, T)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scale)
    return out.view(B, H, q, dv).transpose(1, 2).contiguous()


def _matmul_attention(query, key, value, attention_mask, scale: float, softcap: float | None) -> torch.Tensor:
    B, H, q, D = query.shape
    hkv, T, dv = key.shape[1], key.shape[2], value.shape[-1]
    G = H // hkv
    dtype = query.dtype
    compute = torch.float32 if dtype == torch.float32 or T * D <= UPCAST_ELEMENTS else dtype
    # [B * Hkv, G * q, D]: a view when the query's strides allow it (q == 1 always does)
    q3 = query.reshape(B * hkv, G * q, D).to(compute)
    k3 = key.to(compute).contiguous().view(B * hkv, T, D)
    v3 = value.to(compute).contiguous().view(B * hkv, T, dv)

    scores = torch.bmm(q3, k3.transpose(1, 2))  # [B * Hkv, G * q, T] in the compute dtype
    scores = scores.mul_(scale) if compute == torch.float32 else scores.float() * scale  # fp32 from here
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    masked = attention_mask is not None
    if masked:
        mask = attention_mask
        mask = mask.reshape(mask.shape[0], 1 if mask.shape[1] == 1 else hkv, 1 if mask.shape[1] == 1 else G, q, T)
        s5 = scores.view(B, hkv, G, q, T)
        if mask.dtype == torch.bool:
            s5.masked_fill_(mask.logical_not(), float("-inf"))
        else:
            s5.add_(mask)
    probs = torch.softmax(scores, dim=-1)
    if masked and attention_mask.dtype == torch.bool:
        probs = torch.nan_to_num_(probs, nan=0.0)  # a query that sees nothing: zeros, as sdpa
    out = torch.bmm(probs.to(compute), v3)  # [B * Hkv, G * q, Dv]
    return out.view(B, H, q, dv).transpose(1, 2).to(dtype).contiguous()


def mixed_step_attention(mixed, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         scaling: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Layer `module.layer_idx`'s attention in a mixed step's forward (`phimm.step.MixedStep`): `query
    [N, H, 1, D]`, `key` / `value` `[N, Hkv, 1, D]` (the step's own, already in the batch cache). The running
    rows' tokens attend over their rows of the batch cache (`decode_attention`, or sdpa off the CPU); each joining
    row's prompt attends causally over itself, through transformers' sdpa function as a one-row prefill does.
    Returns `[N, 1, H, Dv]`."""
    out = query.new_empty(query.shape[0], 1, query.shape[1], value.shape[-1])
    nd = mixed.n_decode
    if nd:
        q = query[:nd]
        k, v = mixed.decode_keys(module.layer_idx)
        mask = mixed.decode_mask(query.device)
        if covers(module, q, k, mask, softcap=softcap):
            out[:nd] = decode_attention(q, k, v, mask, scaling=scaling, softcap=softcap)
        else:
            out[:nd] = _sdpa()(module, q, k, v, mask, scaling=scaling)[0]
    for _, s, n in mixed.segments:
        q = query[s:s + n].transpose(0, 2)  # [1, H, n, D]
        k, v = key[s:s + n].transpose(0, 2), value[s:s + n].transpose(0, 2)
        o = _sdpa()(module, q, k, v, None, scaling=scaling, is_causal=True)[0]  # [1, n, H, Dv]
        out[s:s + n] = o.transpose(0, 1)
    return out


def phimm_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None,
                            kernel: str | None = None, **kwargs):
    """transformers' attention-function signature (`AttentionInterface`): `decode_attention` for a few query
    positions against a cache, transformers' `sdpa_attention_forward` for everything else; inside a mixed step's
    forward (`phimm.step`), that step's attention."""
    mixed = step.current()
    if mixed is not None:
        return mixed_step_attention(mixed, module, query, key, value, scaling=scaling,
                                    softcap=kwargs.get("softcap")), None
    if not covers(module, query, key, attention_mask, dropout=dropout, **kwargs):
        if (query.shape[2] == key.shape[2] and kwargs.get("softcap") is None
                and _plain_cpu_call(module, query, dropout, kwargs.get("position_bias"), kwargs)):
            lengths = padded_prefill_lengths(attention_mask)
            if lengths is not None:
                return padded_prefill_attention(module, query, key, value, lengths, scaling=scaling), None
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    return decode_attention(query, key, value, attention_mask, scaling=scaling, softcap=kwargs.get("softcap"),
                            kernel=kernel), None


def register() -> None:
    """Make "phimm" an attention implementation transformers' models can name (its masks are sdpa's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, phimm_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_for_decoder(hf_model, name: str = NAME) -> bool:
    """Set the decoder of a `Phi4MultimodalForCausalLM` to attention `name` ("phimm", or "sdpa" back), leaving
    the vision and audio encoders' sub-configs as they are. Changes only a decoder on sdpa or phimm (an explicit
    eager or flash choice stays). Returns whether the decoder now uses `name`."""
    config = hf_model.config
    current = config._attn_implementation
    if current not in ("sdpa", NAME):
        return current == name
    if name == NAME:
        register()
    config._attn_implementation = {"": name}  # a dict sets this config only, not its sub-configs
    return True
