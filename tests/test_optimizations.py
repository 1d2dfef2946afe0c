"""Every optimisation gives the outputs of the plain path: packed bf16 weights, int8, the feature cache,
grouped prefill."""

from __future__ import annotations

import dataclasses

import pytest

import torch

import phimm
from phimm.quant import PackedWeight
from conftest import make_audio, make_image


def _reqs():
    img, aud = make_image(5, size=(300, 300)), make_audio(5, seconds=0.8)
    return [phimm.Request(prompt="hello there"), phimm.Request(prompt="<|image|>what", images=[img]),
            phimm.Request(prompt="<|audio|>what", audios=[aud]),
            phimm.Request(prompt="<|image|><|audio|>what", images=[img], audios=[aud])]


def _assert_same_outputs(plain, packed):
    """On every route: the same greedy tokens, and first-step logits within bf16 rounding."""
    for req in _reqs():
        a = plain(req, max_new_tokens=4, output_logits=True)
        b = packed(req, max_new_tokens=4, output_logits=True)
        scale = a.logits[0].abs().max().item()
        assert (a.logits[0] - b.logits[0]).abs().max().item() <= 0.02 * scale + 1e-2
        assert a.token_ids[0] == b.token_ids[0]


@pytest.fixture(scope="module")
def bf16_pair(tiny_ckpt):
    plain = phimm.load(tiny_ckpt, dtype="bfloat16", pack_weights=False)
    packed = phimm.load(tiny_ckpt, dtype="bfloat16", pack_weights=True)
    return plain, packed


def test_packed_bf16_matches_plain_bf16(bf16_pair):
    plain, packed = bf16_pair
    targets = packed.model._targets.values()
    assert packed.model.weight_format == "packed" and plain.model.weight_format == "dense"
    _assert_same_outputs(plain, packed)
    packed_layers = [m.base_format for m in targets if isinstance(m.base_format, PackedWeight)]
    assert packed_layers and not any(f.pending for f in packed_layers)
    # the single-route requests ran their adapters' own factors packed too (the tiny adapters' B is non-zero)
    from phimm.quant import AdapterFactor

    pairs = [f for m in targets for pair in m._formatted.values() for f in pair]
    assert pairs and all(isinstance(f, AdapterFactor) or (isinstance(f, PackedWeight) and not f.pending)
                         for f in pairs)
    # the image encoder's layers are packed too, their MLP's GELU inside the first GEMM
    from phimm.quant import PackedLinear

    layers = packed.model.hf.model.embed_tokens_extend.image_embed.img_processor.encoder.layers
    for layer in layers:
        assert isinstance(layer.mlp.fc1, PackedLinear) and isinstance(layer.mlp.fc2, PackedLinear)
        assert layer.mlp.fc1.base_format.activation == "gelu_tanh" and isinstance(layer.mlp.activation_fn,
                                                                                 torch.nn.Identity)
        assert not layer.mlp.fc1.base_format.pending  # the image requests ran through it
        assert all(isinstance(getattr(layer.self_attn, n), PackedLinear) for n in ("q_proj", "k_proj", "v_proj"))
    # and the audio encoder's: no plain linear layer is left in either encoder's layers
    encoders = packed.model.hf.model.embed_tokens_extend
    for root in (encoders.image_embed.img_processor.encoder, encoders.audio_embed.encoder.encoders):
        assert not [p for p, m in root.named_modules() if type(m) is torch.nn.Linear]
    assert any(isinstance(m, PackedLinear) and not m.base_format.pending
               for m in encoders.audio_embed.encoder.encoders.modules())


def test_tied_head_of_a_mapped_bf16_checkpoint_is_packed(tmp_path):
    """A bf16 checkpoint read from its file: the tied output head gets a packed copy and the shared weight's
    pages go back to the file; look-ups read their rows again, and outputs equal the plain path's."""
    from phimm.formats.shards import file_backed
    from phimm.quant import PackedLinear
    from phimm.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "bf16", seed=3, dtype=torch.bfloat16, lora_ranks={"vision": 64, "speech": 48})
    plain = phimm.load(ckpt, dtype="bfloat16", pack_weights=False)
    packed = phimm.load(ckpt, dtype="bfloat16", pack_weights=True)
    emb = packed.model.hf.get_input_embeddings().weight
    assert file_backed(emb) and isinstance(packed.model.hf.lm_head, PackedLinear)
    # the adapters are stored in bf16 too: the layers hold views of the file, not copies
    factors = [t for m in packed.model._targets.values() for t in m.lora_a + m.lora_b if t is not None]
    paged = [t for t in factors if t.numel() * 2 >= 2 * 4096]  # holding a whole page wherever they start
    assert paged and all(t.dtype == torch.bfloat16 and file_backed(t) for t in paged)
    _assert_same_outputs(plain, packed)
    assert not packed.model.hf.lm_head.base_format.pending
    assert torch.equal(emb, plain.model.hf.get_input_embeddings().weight)  # read again from the file


def test_packing_is_lazy_until_first_request(tiny_ckpt):
    """Loading marks the layers and packs nothing (a memory-mapped checkpoint is not read at load time); the
    first request packs the layers it runs through and drops their plain weights."""
    pipe = phimm.load(tiny_ckpt, dtype="bfloat16", pack_weights=True)
    decoder = {p: m for p, m in pipe.model._targets.items() if ".layers." in p and "embed_tokens_extend" not in p}
    formats = [m.base_format for m in decoder.values()]
    assert decoder and all(isinstance(f, PackedWeight) and f.pending and f.source is not None for f in formats)
    pipe("a red circle", max_new_tokens=1)
    # packed, and no plain copy left: neither on the layer nor in the format
    assert all(not f.pending and f.source is None for f in formats)
    assert all(m.weight is None for m in decoder.values())


def test_packed_pipeline_refuses_to_save(bf16_pair, tmp_path):
    with pytest.raises(phimm.errors.CheckpointError, match="pack_weights=False"):
        bf16_pair[1].save_pretrained(tmp_path / "x")


def test_int8_close_to_full_precision(tiny_ckpt):
    from phimm.bench import decode_weight_bytes

    full = phimm.load(tiny_ckpt, dtype="bfloat16", pack_weights=False)
    q = phimm.load(tiny_ckpt, dtype="bfloat16", quantize="int8")
    # int8 values plus one fp32 scale per output row: at hidden 32 the scales weigh 1/8 of the values
    assert decode_weight_bytes(q.model) <= 0.6 * decode_weight_bytes(full.model)
    agree = total = 0
    for req in _reqs():
        a = full(req, max_new_tokens=1, output_logits=True)
        b = q(req, max_new_tokens=1, output_logits=True)
        scale = a.logits[0].abs().max().item()
        assert (a.logits[0] - b.logits[0]).abs().max().item() < 0.1 * scale
        agree += a.token_ids == b.token_ids
        total += 1
    assert agree >= total - 1
    # the adapters still act: vision route differs from the base model on the same image request
    req = _reqs()[1]
    forced_base = phimm.Request(prompt=req.prompt, images=req.images, adapter=phimm.Route(None))
    assert not torch.equal(q(req, max_new_tokens=1, output_logits=True).logits,
                           q(forced_base, max_new_tokens=1, output_logits=True).logits)


def test_feature_cache_returns_what_the_encoder_would(tiny_ckpt):
    pipe = phimm.load(tiny_ckpt)
    cache = pipe.model.feature_cache
    req = _reqs()[3]
    first = pipe(req, max_new_tokens=3, output_logits=True)
    misses = cache.misses
    again = pipe(req, max_new_tokens=3, output_logits=True)
    assert cache.hits >= 2 and cache.misses == misses  # image and audio both served from the cache
    assert torch.equal(first.logits, again.logits)
    cache.capacity = 0
    cache.entries.clear()
    cold = pipe(req, max_new_tokens=3, output_logits=True)
    assert torch.equal(first.logits, cold.logits)


def test_media_digest_is_made_at_prepare_and_tells_contents_apart(tiny_pipe):
    import numpy as np

    prepared, _ = tiny_pipe.prepare(_reqs()[3])
    assert all(m._digest is not None for m in (*prepared.images, *prepared.audios))  # made by prepare
    img = prepared.images[0]
    other = dataclasses.replace(img, pixel_values=img.pixel_values.clone())
    assert other._digest is None and other.digest() == img.digest()  # same content, same key
    other = dataclasses.replace(img, pixel_values=img.pixel_values.clone())
    other.pixel_values.view(-1)[0] += 1.0
    assert other.digest() != img.digest()
    clip = prepared.audios[0]
    shifted = dataclasses.replace(clip, features=clip.features + np.float32(1e-3))
    assert shifted.digest() != clip.digest()


def test_bucketed_prefill_rows_equal_alone(tiny_pipe):
    # rows of similar length share one prefill forward (left-padded, each on its own adapter); far longer rows
    # (the image) get their own
    from phimm.engine import prefill_buckets

    reqs = [phimm.Request(prompt=f"hello number {d}") for d in "123"] + [phimm.Request(prompt="hello number 4 5"),
                                                                         _reqs()[1]]  # 8, 8, 8, 10 tokens; 548
    prepared = [tiny_pipe.prepare(r) for r in reqs]
    lengths = [len(p.input_ids) for p, _ in prepared]
    buckets = prefill_buckets(lengths)
    assert sorted(map(len, buckets)) == [1, 4] and [4] in buckets  # the image row alone
    assert prefill_buckets([10, 10, 10]) == [[0, 1, 2]] and prefill_buckets([10, 40]) == [[0], [1]]
    before = tiny_pipe.engine.counters["prefills"]
    batch = tiny_pipe(reqs, max_new_tokens=4, output_logits=True)
    assert tiny_pipe.engine.counters["prefills"] - before == 2
    for req, got in zip(reqs, batch):
        alone = tiny_pipe(req, max_new_tokens=4, output_logits=True)
        assert got.token_ids == alone.token_ids
        assert (got.logits - alone.logits).abs().max().item() < 1e-5

@pytest.mark.skipif(not PackedWeight.applies(torch.ones(1, 1, dtype=torch.bfloat16)), reason="needs oneDNN bf16")
@pytest.mark.parametrize("fmt", ["packed_adapter", "adapter_factor"])
def test_packed_adapter_adds_b_inside_the_gemm_for_long_inputs(fmt):
    """A bf16 `LoraLinear` with packed base and its adapter factors in a format (oneDNN-packed, or as they are
    through phimm's gemv kernel): short inputs (decode) add B's output after its GEMM (or inside the kernel), long
    ones (prefill, > FORMATTED_B_MAX_TOKENS tokens) in place inside it (`addmm_`); both equal base + scale * B A x
    computed in fp32 from the same weights, within bf16 rounding, in 2-D and 3-D."""
    from torch import nn

    from adapters import LoraLinear
    from adapters.lora import FORMATTED_B_MAX_TOKENS, RowAdapters
    from phimm import quant

    packed_adapter = getattr(quant, fmt)

    g = torch.Generator().manual_seed(0)
    base = nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    a = (torch.randn(8, 96, generator=g) / 10).to(torch.bfloat16)
    b = (torch.randn(160, 8, generator=g) / 3).to(torch.bfloat16)  # B non-zero: the adapter changes the output
    w, bias = base.weight.float(), base.bias.float()
    layer = LoraLinear(base)
    layer.set_adapter_weights(0, a, b, 2.0)
    layer.set_base_format(PackedWeight(base.weight, base.bias, lazy=False))
    layer.set_adapter_format(packed_adapter)
    rows = RowAdapters(uniform=0, ranks=(8,))
    for shape in ((1, 96), (FORMATTED_B_MAX_TOKENS, 96), (FORMATTED_B_MAX_TOKENS + 1, 96), (300, 96), (2, 70, 96)):
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        want = x.float() @ w.t() + bias + 2.0 * (x.float() @ a.float().t()) @ b.float().t()
        with torch.inference_mode():  # as the runtime's forwards run (packed formats have no autograd)
            got = layer(x, rows)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        adapter_part = (want - (x.float() @ w.t() + bias)).abs().max().item()
        assert adapter_part > 0.5  # the adapter matters here
        assert (got.float() - want).abs().max().item() <= 0.02 * want.abs().max().item(), shape


@pytest.mark.skipif(not PackedWeight.applies(torch.ones(1, 1, dtype=torch.bfloat16)), reason="needs oneDNN bf16")
@pytest.mark.parametrize("fmt", ["packed_adapter", "adapter_factor"])
def test_packed_adapters_on_runs_of_a_mixed_step(fmt):
    """A mixed step's rows (one per token), packed bf16 base and adapters: the long runs take their adapter's
    packed path (B inside its GEMM, written back into the run's rows), the short rows the masked one; every row
    equals base + its own adapter's delta computed in fp32."""
    from torch import nn

    from adapters import LoraLinear
    from adapters.lora import FORMATTED_B_MAX_TOKENS, RUN_MIN_TOKENS, RowAdapters
    from phimm import quant

    packed_adapter = getattr(quant, fmt)

    g = torch.Generator().manual_seed(2)
    base = nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    w, bias = base.weight.float(), base.bias.float()
    layer = LoraLinear(base)
    factors = []
    for i, r in enumerate((8, 4)):
        a = (torch.randn(r, 96, generator=g) / 10).to(torch.bfloat16)
        b = (torch.randn(160, r, generator=g) / 3).to(torch.bfloat16)  # B non-zero
        layer.set_adapter_weights(i, a, b, 2.0 if i == 0 else 1.5)
        factors.append((a.float(), b.float(), 2.0 if i == 0 else 1.5))
    layer.set_base_format(PackedWeight(base.weight, base.bias, lazy=False))
    layer.set_adapter_format(packed_adapter)
    n = max(RUN_MIN_TOKENS, FORMATTED_B_MAX_TOKENS + 1)
    row_adapter = [1, 0, None] + [0] * n + [None] * 5 + [1] * (n + 7)
    rows = RowAdapters.for_rows(row_adapter, [8, 4], [2.0, 1.5], dtype=torch.bfloat16)
    assert [p.uniform for _, _, p in rows.parts(1)] == [None, 0, None, 1]
    x = torch.randn(len(row_adapter), 1, 96, generator=g).to(torch.bfloat16)
    with torch.inference_mode():  # as the runtime's forwards run
        got = layer(x, rows)
    want = x.float() @ w.t() + bias
    for i, ad in enumerate(row_adapter):
        if ad is not None:
            a, b, scale = factors[ad]
            want[i] += scale * (x[i].float() @ a.t()) @ b.t()
    assert (want - (x.float() @ w.t() + bias)).abs().max().item() > 0.5  # the adapters matter here
    assert (got.float() - want).abs().max().item() <= 0.02 * want.abs().max().item()


@pytest.mark.skipif(not PackedWeight.applies(torch.ones(1, 1, dtype=torch.bfloat16)), reason="needs oneDNN bf16")
@pytest.mark.parametrize("activation,approximate", [("gelu_tanh", "tanh"), ("gelu", "none")])
def test_packed_weight_applies_its_activation_inside_the_gemm(activation, approximate):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(48, 40, generator=g) / 5).to(torch.bfloat16)
    bias = torch.randn(48, generator=g).to(torch.bfloat16)
    x = torch.randn(3, 7, 40, generator=g).to(torch.bfloat16)
    want = torch.nn.functional.gelu(x.float() @ w.float().t() + bias.float(), approximate=approximate)
    got = PackedWeight(w, bias, lazy=False, activation=activation)(x)
    assert got.shape == want.shape
    assert (got.float() - want).abs().max().item() <= 0.02 * want.abs().max().item()
    # and differs from the GEMM alone: the activation was applied
    assert (PackedWeight(w, bias, lazy=False)(x).float() - want).abs().max().item() > 0.1


@pytest.mark.parametrize("kernel", ["onednn", "fbgemm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_int8_weight_kernels_match_float_math(kernel, dtype):
    """`Int8Weight` on each CPU kernel: x W^T + b within int8 rounding of the float result, in 2-D and 3-D, the
    input left as it was; both kernels agree with each other as closely."""
    from phimm.quant import Int8Weight, _fbgemm_ok, _onednn_int8_ok

    if not (_onednn_int8_ok() if kernel == "onednn" else _fbgemm_ok()):
        pytest.skip(f"torch here has no {kernel} int8 kernel")
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(96, 160, generator=g) / 10).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype)
    fmt = Int8Weight(w, bias, kernel=kernel)
    assert fmt.use_onednn == (kernel == "onednn")
    for shape in ((1, 160), (7, 160), (2, 5, 160)):
        x = torch.randn(*shape, generator=g).to(dtype)
        before = x.clone()
        got = fmt(x)
        assert torch.equal(x, before) and got.dtype == dtype and got.shape == (*shape[:-1], 96)
        want = x.float() @ w.float().t() + bias.float()
        err = (got.float() - want).abs().max().item()
        assert err <= 0.03 * want.abs().max().item(), (shape, err)


def test_int8_auto_kernel_chooses_by_weight_size(monkeypatch):
    from phimm import quant

    if not (quant._onednn_int8_ok() and quant._fbgemm_ok()):
        pytest.skip("needs both CPU int8 kernels")
    w = torch.randn(64, 32)
    assert not quant.Int8Weight(w, None, kernel="auto").use_onednn  # small: fbgemm
    monkeypatch.setattr(quant, "INT8_ONEDNN_MIN_ELEMENTS", w.numel())
    fmt = quant.Int8Weight(w, None, kernel="auto")
    assert fmt.use_onednn and not fmt.use_fbgemm
