"""phimm's decode attention (`phimm.attention`) against transformers' sdpa path: random tensors with grouped-query
attention and padding masks, and the tiny model's tokens and logits through `phimm.load`."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image

from phimm import attention
from phimm.attention import covers, decode_attention, phimm_attention_forward


class _Module(torch.nn.Module):
    """What transformers' attention functions read off the attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.eval()


def _sdpa(query, key, value, mask, scaling):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, _ = sdpa_attention_forward(_Module(query.shape[1] // key.shape[1]), query, key, value, mask,
                                    scaling=scaling)
    return out


def _cache_view(B, hkv, T, D, dtype, gen):
    """K or V as the cache hands them over: the filled part of a buffer with spare columns."""
    buf = torch.randn(B, hkv, T + 13, D, generator=gen).to(dtype)
    return buf[:, :, :T]


def _mask(lengths, q, T, kind):
    """Left-padded rows of `lengths` positions (the last `q` are the queries'), causal among the queries:
    boolean `[B, 1, q, T]`, or the same as an additive float mask."""
    cols = torch.arange(T)
    rows = []
    for n in lengths:
        qpos = torch.arange(T - q, T)[:, None]  # each query's own column
        rows.append((cols[None, :] >= T - n) & (cols[None, :] <= qpos))
    m = torch.stack(rows)[:, None]
    if kind == "additive":
        return torch.zeros(m.shape).masked_fill_(~m, torch.finfo(torch.float32).min)
    return m


CASES = [  # (B, heads, kv heads, head dim, cached positions, query positions, mask)
    (1, 4, 2, 16, 40, 1, None),
    (1, 6, 2, 16, 40, 1, None),
    (3, 8, 4, 64, 1100, 1, "bool"),      # long: bf16 GEMMs (T * D > UPCAST_ELEMENTS)
    (3, 6, 2, 32, 70, 1, "bool"),        # short: computed in fp32
    (3, 9, 3, 64, 600, 1, "additive"),
    (2, 4, 2, 64, 700, 2, "bool"),
    (2, 6, 2, 16, 50, 4, "bool"),
    (2, 6, 2, 128, 300, 3, "additive"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-KV{}-D{}-T{}-q{}-{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["phimm", "flash", "matmul"])
def test_matches_sdpa_on_random_tensors(case, dtype, kernel):
    B, H, hkv, D, T, q, kind = case
    gen = torch.Generator().manual_seed(T + q)
    query = torch.randn(B, q, H, D, generator=gen).to(dtype).transpose(1, 2)  # as the model makes it
    key, value = _cache_view(B, hkv, T, D, dtype, gen), _cache_view(B, hkv, T, D, dtype, gen)
    lengths = [T, T - 7, max(q + 1, T // 3)][:B]
    mask = None if kind is None else _mask(lengths, q, T, kind)
    scaling = D ** -0.5
    module = _Module(H // hkv)
    assert covers(module, query, key, mask)
    ours, weights = phimm_attention_forward(module, query, key, value, mask, scaling=scaling, kernel=kernel)
    assert weights is None
    ref = _sdpa(query, key, value, mask, scaling)
    assert ours.shape == ref.shape == (B, q, H, D) and ours.dtype == dtype and ours.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    else:
        # both against the fp32 result of the same bf16 inputs: ours within bf16 rounding, as sdpa is
        exact = _sdpa(query.float(), key.float(), value.float(), mask, scaling)
        err_ours = (ours.float() - exact).abs().max().item()
        err_sdpa = (ref.float() - exact).abs().max().item()
        scale = exact.abs().max().item()
        assert err_ours <= 2 ** -6 * scale, (err_ours, err_sdpa, scale)
        torch.testing.assert_close(ours.float(), ref.float(), rtol=2 ** -6, atol=2 ** -6 * scale)


@pytest.mark.parametrize("kernel", ["flash", "matmul"])
def test_head_mask_and_query_that_sees_nothing(kernel):
    """A per-head mask `[B, H, q, T]` is read per head; a query row with nothing visible gives zeros (sdpa's)."""
    gen = torch.Generator().manual_seed(0)
    B, H, hkv, D, T, q = 2, 6, 3, 16, 30, 2
    query = torch.randn(B, H, q, D, generator=gen)
    key, value = torch.randn(B, hkv, T, D, generator=gen), torch.randn(B, hkv, T, D, generator=gen)
    mask = torch.rand(B, H, q, T, generator=gen) > 0.3
    mask[1, 4, 0] = False
    ours = decode_attention(query, key, value, mask, scaling=0.3, kernel=kernel)
    ref = _sdpa(query, key, value, mask, 0.3)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert (ours[1, 0, 4] == 0).all()


def test_softcap():
    """sdpa has no softcap: the matmul kernel applies it (tanh(s / c) * c on the scaled scores, before the mask)."""
    gen = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(1, 4, 1, 8, generator=gen), torch.randn(1, 2, 20, 8, generator=gen),
                         torch.randn(1, 2, 20, 8, generator=gen))
    ours = decode_attention(query, key, value, scaling=0.5, softcap=3.0)
    k, v = key.repeat_interleave(2, 1), value.repeat_interleave(2, 1)
    s = torch.tanh(query @ k.transpose(-1, -2) * 0.5 / 3.0) * 3.0
    ref = (s.softmax(-1) @ v).transpose(1, 2)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_prefill_and_uncovered_calls_go_to_sdpa(monkeypatch):
    module = _Module(2)
    q1 = torch.randn(1, 4, 1, 8)
    prefill = torch.randn(1, 4, 9, 8)
    kv = torch.randn(1, 2, 9, 8)
    assert covers(module, q1, kv, None)
    assert not covers(module, prefill, kv, None)                                        # q == T: a prefill
    assert not covers(module, torch.randn(1, 4, attention.MAX_QUERY_LEN + 1, 8), torch.randn(1, 2, 40, 8),
                      torch.ones(1, 1, attention.MAX_QUERY_LEN + 1, 40, dtype=torch.bool))  # too many queries
    assert not covers(module, torch.randn(1, 4, 2, 8), kv, None)                        # q > 1 needs a mask
    assert not covers(module, q1, kv, None, position_bias=torch.zeros(1, 4, 1, 9))
    called = []
    import transformers.integrations.sdpa_attention as sdpa_module

    real = sdpa_module.sdpa_attention_forward
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", lambda *a, **k: called.append(1) or real(*a, **k))
    out, _ = phimm_attention_forward(module, prefill, kv, kv, None, scaling=0.3)
    assert called and out.shape == (1, 9, 4, 8)


def _two_pipes(ckpt):
    import phimm

    ours = phimm.load(ckpt, dtype="float32", threads=1)
    ref = phimm.load(ckpt, dtype="float32", threads=1)
    assert attention.use_for_decoder(ref.model.hf, "sdpa")
    return ours, ref


def test_decoder_only_uses_it(tiny_ckpt):
    ours, ref = _two_pipes(tiny_ckpt)
    cfg = ours.model.hf.config
    assert cfg._attn_implementation == "phimm"
    assert cfg.vision_config._attn_implementation == "sdpa" and cfg.audio_config._attn_implementation == "sdpa"
    assert ref.model.hf.config._attn_implementation == "sdpa"
    assert ref.model.hf.config.vision_config._attn_implementation == "sdpa"


def test_tiny_model_tokens_and_logits_equal_sdpa(tiny_ckpt, monkeypatch):
    import phimm

    ours, ref = _two_pipes(tiny_ckpt)
    calls = []
    real = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    reqs = [phimm.Request(prompt="<|user|>hello what color is the circle<|end|><|assistant|>"),
            phimm.Request(messages=[{"role": "user", "content": [{"type": "image", "image": make_image(3)},
                                                                 {"type": "text", "text": "what shape"}]}])]
    kw = dict(max_new_tokens=6, min_new_tokens=6, output_logits=True)
    for got, want in [(ours(r, **kw), ref(r, **kw)) for r in reqs] + list(zip(ours(reqs, **kw), ref(reqs, **kw))):
        assert got.error is None and want.error is None
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(got.logits[0], want.logits[0], rtol=0, atol=1e-5)
        assert max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits)) <= 1e-5
    assert calls and max(s[2] for s in calls) > 400  # decode steps of the image row went through it


@pytest.mark.parametrize("kernel", ["flash", "matmul"])
def test_rows_of_very_different_lengths_split_into_calls_of_their_own_width(kernel, monkeypatch):
    """Right-aligned rows (a decode step over the batch cache): the long rows get calls over exactly their own
    columns, the others one call over the last few columns; the result is the one call's over every column."""
    from phimm import attention

    gen = torch.Generator().manual_seed(3)
    B, H, hkv, D, T = 6, 4, 2, 8, 300
    lengths = [300, 12, 25, 7, 260, 40]
    query = torch.randn(B, H, 1, D, generator=gen)
    key, value = torch.randn(B, hkv, T, D, generator=gen), torch.randn(B, hkv, T, D, generator=gen)
    mask = (torch.arange(T)[None, :] >= (T - torch.tensor(lengths))[:, None])[:, None, None, :]
    monkeypatch.setattr(attention, "SPLIT_CALL_BYTES", 0)
    whole = decode_attention(query, key, value, mask, scaling=0.3, kernel=kernel)
    monkeypatch.setattr(attention, "SPLIT_CALL_BYTES", 64 * hkv * 2 * D * 4)  # a call: 64 columns
    plan = attention.split_plan(lengths, T, hkv * 2 * D * 4)
    assert plan is not None and plan[0] == 40 and sorted(plan[1]) == [(0, 300), (4, 260)]
    calls = []
    real = attention._flash_attention if kernel == "flash" else attention._matmul_attention
    monkeypatch.setattr(attention, "_flash_attention" if kernel == "flash" else "_matmul_attention",
                        lambda q, k, v, m, *a: calls.append(k.shape[2]) or real(q, k, v, m, *a))
    split = decode_attention(query, key, value, mask, scaling=0.3, kernel=kernel)
    assert sorted(calls) == [40, 260, 300]
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(split, _sdpa(query, key, value, mask, 0.3), rtol=0, atol=1e-5)
    # a mask that is not right-aligned is not split
    holes = mask.clone()
    holes[0, 0, 0, 100] = False
    calls.clear()
    decode_attention(query, key, value, holes, scaling=0.3, kernel=kernel)
    assert calls == [T]
    # rows of about one length: one call
    assert attention.split_plan([300, 290, 280], 300, hkv * 2 * D * 4) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_padded_prefill_runs_each_row_causally_over_its_own_positions(dtype):
    """A prefill of left-padded rows: one causal call per row over its own positions gives what sdpa gives with
    the padded causal mask, at every real query position; the padded ones get zeros."""
    gen = torch.Generator().manual_seed(5)
    B, H, hkv, D, T = 3, 6, 2, 32, 90
    lengths = [90, 71, 1]
    query = torch.randn(B, H, T, D, generator=gen).to(dtype)
    key, value = (torch.randn(B, hkv, T, D, generator=gen).to(dtype) for _ in range(2))
    mask = _mask(lengths, T, T, "bool")
    assert attention.padded_prefill_lengths(mask) == lengths
    out, _ = phimm_attention_forward(_Module(H // hkv), query, key, value, mask, scaling=0.2)
    want = _sdpa(query, key, value, mask, 0.2)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i, T - n:], want[i, T - n:], **tol)
        assert not out[i, :T - n].any()
    # each row's call is the one a prefill of that row alone makes (no mask, causal): equal to the last bit
    alone = _sdpa(query[1:2, :, T - 71:], key[1:2, :, T - 71:], value[1:2, :, T - 71:], None, 0.2)
    assert torch.equal(out[1, T - 71:], alone[0])


def test_masks_that_are_not_padded_causal_go_to_sdpa():
    T = 40
    causal = _mask([40, 30], T, T, "bool")
    assert attention.padded_prefill_lengths(causal) == [40, 30]
    window = causal & (torch.arange(T)[None, :] > torch.arange(T)[:, None] - 8)  # a sliding window of 8
    assert attention.padded_prefill_lengths(window) is None
    both_ways = causal | causal.transpose(-1, -2)  # bidirectional within the rows
    assert attention.padded_prefill_lengths(both_ways) is None
    assert attention.padded_prefill_lengths(_mask([40, 30], T, T, "additive")) is None
    assert attention.padded_prefill_lengths(None) is None
    assert attention.padded_prefill_lengths(_mask([10, 4], 2, 10, "bool")) is None  # decode-shaped: q != T


def test_tiny_model_rows_prefilled_together_equal_sdpa_alone(tiny_ckpt, monkeypatch):
    """Prompts of similar lengths share a left-padded prefill bucket; each row's tokens and logits equal the
    same prompt run alone on transformers' sdpa."""
    import phimm

    ours, ref = _two_pipes(tiny_ckpt)
    calls = []
    real = attention.padded_prefill_attention
    monkeypatch.setattr(attention, "padded_prefill_attention",
                        lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    prompts = ["hello what color is the circle", "what shape is the red one here", "is there a blue square"]
    reqs = [phimm.Request(prompt=f"<|user|>{p}<|end|><|assistant|>") for p in prompts]
    kw = dict(max_new_tokens=5, min_new_tokens=5, output_logits=True)
    batch = ours(reqs, **kw)
    assert calls and any(len(set(c)) > 1 for c in calls)  # rows of different lengths, padded in one call
    for got, r in zip(batch, reqs):
        want = ref(r, **kw)
        assert got.token_ids == want.token_ids
        assert max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits)) <= 1e-5


native = pytest.mark.skipif(attention.attention_kernel() is None,
                            reason="phimm's decode-attention kernel cannot be built here (no compiler or no AVX-512)")


def _right_aligned(lengths, T):
    return (torch.arange(T)[None, :] >= (T - torch.tensor(lengths))[:, None])[:, None, None, :]


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(24, 8, 128), (16, 4, 64), (7, 1, 32), (6, 6, 16), (12, 2, 80)],
                         ids=lambda s: "H{}-KV{}-D{}".format(*s))
def test_native_kernel_matches_exact_attention(dtype, shape, monkeypatch):
    """phimm's kernel on rows of very different right-aligned lengths (one row seeing nothing, rows of 1-5
    positions through its short-row paths), query groups of 1 to 7 heads per KV head (over 4: two passes), head
    dims through the vdpbf16ps path (multiples of 32) and the widening one (80, 16): against attention computed
    in float64 from the same inputs, as close as sdpa's kernels are; no other kernel is called."""
    H, hkv, D = shape
    gen = torch.Generator().manual_seed(H * D)
    T = 203
    lengths = [203, 0, 1, 3, 5, 64, 200]
    B = len(lengths)
    query = torch.randn(B, 1, H, D, generator=gen).to(dtype).transpose(1, 2)
    key, value = _cache_view(B, hkv, T, D, dtype, gen), _cache_view(B, hkv, T, D, dtype, gen)
    mask = _right_aligned(lengths, T)
    monkeypatch.setattr(attention, "_flash_attention", lambda *a: pytest.fail("flash kernel called"))
    monkeypatch.setattr(attention, "_matmul_attention", lambda *a: pytest.fail("matmul kernel called"))
    ours = decode_attention(query, key, value, mask, scaling=D ** -0.5, kernel="phimm")
    assert ours.shape == (B, 1, H, D) and ours.dtype == dtype and ours.is_contiguous()
    g = H // hkv
    s = torch.einsum("bhd,bhtd->bht", query[:, :, 0].double(), key.double().repeat_interleave(g, 1)) * D ** -0.5
    s = s.masked_fill(~mask[:, 0], float("-inf"))
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)
    exact = torch.einsum("bht,bhtd->bhd", p, value.double().repeat_interleave(g, 1))[:, None]
    assert (ours[1] == 0).all()  # the row that sees nothing
    err = (ours.double() - exact).abs().max().item()
    if dtype == torch.float32:
        assert err <= 2e-6, err
    else:  # bf16 output: within a rounding of the largest value, as sdpa
        ref = _sdpa(query, key, value, mask, D ** -0.5).double()
        assert err <= max(2 ** -8 * exact.abs().max().item(), 1.5 * (ref - exact).abs().max().item()), err


@native
def test_native_kernel_threads_and_fallbacks(monkeypatch):
    """Two threads give what one gives, bit for bit; a mask that is not right-aligned, an additive mask and a
    softcap go to the other kernels; a lone row without a mask reads every column."""
    gen = torch.Generator().manual_seed(5)
    B, H, hkv, D, T = 4, 24, 8, 128, 300
    query = torch.randn(B, 1, H, D, generator=gen).to(torch.bfloat16).transpose(1, 2)
    key, value = _cache_view(B, hkv, T, D, torch.bfloat16, gen), _cache_view(B, hkv, T, D, torch.bfloat16, gen)
    mask = _right_aligned([300, 40, 299, 7], T)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_attention(query, key, value, mask, kernel="phimm")
        torch.set_num_threads(2)
        two = decode_attention(query, key, value, mask, kernel="phimm")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    whole = decode_attention(query[:1], key[:1], value[:1], None, kernel="phimm")
    assert torch.equal(whole, one[:1])  # row 0 sees every column: no mask means the same
    calls = []
    real = attention._flash_attention
    monkeypatch.setattr(attention, "_flash_attention", lambda *a: calls.append(1) or real(*a))
    holes = mask.clone()
    holes[0, 0, 0, 10] = False
    decode_attention(query, key, value, holes, kernel="phimm")
    additive = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
    decode_attention(query.float(), key.float(), value.float(), additive, kernel="phimm")
    assert len(calls) == 2
    capped = decode_attention(query.float(), key.float(), value.float(), mask, softcap=30.0, kernel="phimm")
    assert capped.shape == (B, 1, H, D)
