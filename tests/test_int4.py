"""Group-wise weight-only int4 (`quantize="int4"`): the format against a float reference, its bytes, and every
route of a tiny model loaded in it."""

from __future__ import annotations

import pytest
import torch

import phimm
from phimm.kernels import int4_kernel
from phimm.quant import INT4_GROUP_SIZE, Int4Weight
from conftest import make_audio, make_image


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _needs(kernel):
    if kernel == "phimm" and int4_kernel() is None:
        pytest.skip("phimm's int4 kernel does not build here (no C++ compiler or no AVX-512 VNNI)")


# phimm's kernel, torch's CPU int4 kernel, and the dequantizing fallback
@pytest.mark.parametrize("kernel", ["phimm", "aten", None])
def test_int4_matches_float_reference(kernel):
    _needs(kernel)
    g = torch.Generator().manual_seed(0)
    n, k = 192, 512
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    fmt = Int4Weight(w, b, use_kernel=kernel is not None, kernel=kernel)
    assert fmt.group == INT4_GROUP_SIZE == 128
    assert fmt.kernel == kernel
    x2 = torch.randn(5, k, generator=g).to(torch.bfloat16)
    x3 = torch.randn(2, 3, k, generator=g).to(torch.bfloat16)
    for x in (x2, x3):
        y = fmt(x)
        assert y.shape == (*x.shape[:-1], n) and y.dtype == torch.bfloat16
        ref = x.float() @ w.float().t() + b.float()
        # 4 bits, min/max per group of 128 on gaussian weights: measured 0.095-0.098
        assert _rel(y, ref) < 0.12
        # against the weight the int4 values stand for, only bf16 rounding remains (the packing is read right),
        # and for phimm's kernel the int8 rounding of its input (measured 0.010; exact: the test below)
        deq = fmt.dequantize()
        assert deq.shape == (n, k)
        assert _rel(y, x.float() @ deq.t() + b.float()) < (0.02 if kernel == "phimm" else 0.01)
    # float32 activations: cast to bf16 for the kernel and back
    y32 = fmt(x2.float())
    assert y32.dtype == torch.float32 and _rel(y32, fmt(x2)) < (0.02 if kernel == "phimm" else 0.01)
    # the bias is added: a zero input gives it back, and without one, zero
    zeros = torch.zeros(2, k, dtype=torch.bfloat16)
    assert torch.equal(fmt(zeros), b.expand(2, n))
    assert not Int4Weight(w, None, use_kernel=kernel is not None, kernel=kernel)(zeros).any()


@pytest.mark.parametrize("kernel", ["phimm", "aten"])
def test_int4_kernel_and_fallback_agree(kernel):
    _needs(kernel)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g).to(torch.bfloat16)
    x = torch.randn(3, 256, generator=g).to(torch.bfloat16)
    a, b = Int4Weight(w, None, kernel=kernel), Int4Weight(w, None, use_kernel=False)
    assert a.kernel == kernel
    assert torch.allclose(a.dequantize(), b.dequantize(), atol=1e-2)
    assert _rel(a(x), b(x)) < (0.02 if kernel == "phimm" else 0.01)


def test_phimm_int4_kernel_is_exact_on_its_quantized_input():
    """phimm's kernel computes exactly what it promises: the input rounded to int8 per group of 128 (absmax /
    127), exact int4 x int8 sums per group, the zero points against the unquantized input. Checked against that
    computation written out in float64 for the row counts the kernel's blocking distinguishes (one or two rows,
    with two accumulator chains each; more; passes of 12 rows, with and without a remainder), with fp32 input."""
    _needs("phimm")
    g = torch.Generator().manual_seed(3)
    n, k, group = 48, 384, 128
    w = torch.randn(n, k, generator=g)
    fmt = Int4Weight(w, None, kernel="phimm")
    deq = fmt.dequantize(torch.float64)  # q * s + c per group, with s and c as stored (bf16)
    s = fmt.scales_and_zeros.double().reshape(n // 16, k // group, 2, 16)[:, :, 0].permute(0, 2, 1).reshape(n, -1)
    c = fmt.scales_and_zeros.double().reshape(n // 16, k // group, 2, 16)[:, :, 1].permute(0, 2, 1).reshape(n, -1)
    q = (deq.reshape(n, -1, group) - c[..., None]) / s[..., None]
    assert torch.allclose(q, q.round(), atol=1e-6) and q.min() >= 0 and q.max() <= 15
    for m in (1, 2, 3, 7, 12, 25):
        x = torch.randn(m, k, generator=g) * torch.linspace(0.1, 3, k)
        xg = x.double().reshape(m, -1, group)
        sx = xg.abs().amax(-1, keepdim=True) / 127
        xq = torch.clamp(torch.round(xg / sx), -127, 127)
        dots = torch.einsum("mgk,ngk->mng", xq, q.round())
        ref = (dots * sx[..., 0][:, None] * s[None]).sum(-1) + (xg.sum(-1)[:, None] * c[None]).sum(-1)
        y = fmt(x)
        assert y.dtype == torch.float32
        assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
    # output blocks are shared out over threads: the same result, bit for bit
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(fmt(x), y)
    finally:
        torch.set_num_threads(threads)


def test_int4_falls_back_to_torch_kernel_when_the_build_fails(monkeypatch, tmp_path, caplog):
    """No compiler that works (or PHIMM_NO_NATIVE_KERNELS): torch's kernel, with the reason logged."""
    import phimm.kernels as kernels

    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("PHIMM_KERNEL_CACHE", str(tmp_path))  # nothing built before
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    w = torch.randn(32, 128).to(torch.bfloat16)
    with caplog.at_level("WARNING", logger="phimm.kernels"):
        fmt = Int4Weight(w, None)
    assert kernels.int4_kernel() is None and fmt.kernel == "aten"
    assert "failed" in caplog.text
    with pytest.raises(RuntimeError, match="not available"):
        Int4Weight(w, None, kernel="phimm")
    assert not list(tmp_path.iterdir())  # no half-written library left behind
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PHIMM_NO_NATIVE_KERNELS", "1")
    assert kernels.int4_kernel() is None and Int4Weight(w, None).kernel == "aten"


def test_int4_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="phimm.*aten"):
        Int4Weight(torch.randn(16, 32), None, kernel="cublas")


def test_int4_odd_shapes_are_padded():
    """Output channels not a multiple of 16, input channels not a multiple of 32: zero-padded, same result."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(50, 40, generator=g).to(torch.bfloat16)
    b = torch.randn(50, generator=g).to(torch.bfloat16)
    x = torch.randn(4, 40, generator=g).to(torch.bfloat16)
    fmt = Int4Weight(w, b)
    y = fmt(x)
    assert y.shape == (4, 50) and fmt.group == 32
    assert _rel(y, x.float() @ w.float().t() + b.float()) < 0.12
    assert _rel(y, Int4Weight(w, b, use_kernel=False)(x)) < 0.02


def test_int4_nbytes():
    w = torch.randn(256, 1024).to(torch.bfloat16)
    fmt = Int4Weight(w, None)
    bf16 = w.numel() * w.element_size()
    # 128 weights: 64 bytes of values + a bf16 scale and zero = 68 bytes, 0.266x bf16
    assert fmt.nbytes == w.numel() // 2 + (1024 // 128) * 256 * 2 * 2
    assert fmt.nbytes <= 0.3 * bf16


def _reqs():
    img, aud = make_image(5, size=(300, 300)), make_audio(5, seconds=0.8)
    return [phimm.Request(prompt="hello there"), phimm.Request(prompt="<|image|>what", images=[img]),
            phimm.Request(prompt="<|audio|>what", audios=[aud]),
            phimm.Request(prompt="<|image|><|audio|>what", images=[img], audios=[aud])]


def test_int4_pipeline_runs_every_route(tiny_ckpt):
    from adapters import LoraLinear
    from phimm.bench import decode_weight_bytes

    full = phimm.load(tiny_ckpt, dtype="bfloat16", pack_weights=False)
    q = phimm.load(tiny_ckpt, dtype="bfloat16", quantize="int4")
    assert q.model.weight_format == "int4"

    def projection_bytes(model):
        return sum(m.base_nbytes for m in model.hf.model.layers.modules() if isinstance(m, LoraLinear))

    # hidden 32 / intermediate 64: groups of 32, 16 bytes of values + 4 of scale and zero, 0.31x bf16
    assert projection_bytes(q.model) <= 0.35 * projection_bytes(full.model)
    assert decode_weight_bytes(q.model) <= 0.4 * decode_weight_bytes(full.model)
    assert isinstance(q.model.hf.lm_head.base_format, Int4Weight)
    formats = [m.base_format for m in q.model.hf.model.layers.modules() if isinstance(m, LoraLinear)]
    assert formats and all(isinstance(f, Int4Weight) for f in formats)

    routes = set()
    for req in _reqs():
        a = full(req, max_new_tokens=3, output_logits=True)
        b = q(req, max_new_tokens=3, output_logits=True)
        assert b.error is None and len(b.token_ids) == 3
        routes.add(b.route.adapter)
        assert torch.isfinite(b.logits).all()
        # 4-bit random weights: close, not equal (first-step logits measured 0.06-0.16 of their largest off)
        scale = a.logits[0].abs().max().item()
        assert (a.logits[0] - b.logits[0]).abs().max().item() < 0.3 * scale
    assert routes == {None, "vision", "speech"}
    # mixed batch, each row on its own route
    outs = q(_reqs(), max_new_tokens=2)
    assert all(o.error is None and len(o.token_ids) == 2 for o in outs)
    # the adapters still act (full precision): the vision route differs from the base model on the same request
    req = _reqs()[1]
    forced_base = phimm.Request(prompt=req.prompt, images=req.images, adapter=phimm.Route(None))
    assert not torch.equal(q(req, max_new_tokens=1, output_logits=True).logits,
                           q(forced_base, max_new_tokens=1, output_logits=True).logits)


def test_unknown_quantization_names_the_choices(tiny_ckpt):
    with pytest.raises(ValueError, match="int8.*int4"):
        phimm.load(tiny_ckpt, dtype="bfloat16", quantize="int5")
