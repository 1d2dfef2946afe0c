"""phimm's one-pass RMSNorm (`phimm.norm`, `phimm/kernels/rms_norm.cpp`) against transformers' module on the same
weights, and where the loaded model uses it."""

from __future__ import annotations

import pytest
import torch

from phimm import norm
from phimm.kernels import norm_kernel

pytestmark = pytest.mark.skipif(norm_kernel() is None,
                                reason="phimm's RMSNorm kernel cannot be built here (no compiler or no AVX-512)")


def _module(n: int, dtype, gen):
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalRMSNorm

    m = Phi4MultimodalRMSNorm(n, eps=1e-5)
    with torch.no_grad():
        m.weight.copy_(torch.randn(n, generator=gen) * 0.5 + 1)
    return m.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [3072, 1000, 17])
def test_kernel_matches_the_module(dtype, n):
    """Rows of a 3-D input, of a strided view (the rows of a wider buffer) and a single row: within fp32's last
    bits of the module's output in fp32; in bf16 equal but for a rare rounding, never more than one bf16 step."""
    gen = torch.Generator().manual_seed(n)
    m = _module(n, dtype, gen)
    wide = (torch.randn(3, 40, n + 24, generator=gen) * 3).to(dtype)
    kernel = norm_kernel()
    for x in (wide[..., :n].contiguous(), wide[..., 8:8 + n], wide[1, 5, :n]):
        with torch.no_grad():
            want = m(x)
            got = kernel.rms_norm(x, m.weight, m.variance_epsilon)
        assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
        else:
            differ = got != want
            assert differ.float().mean().item() < 1e-3
            step = want.float().abs() * 2 ** -7  # one bf16 step of the value, at most
            assert ((got.float() - want.float()).abs() <= step + 1e-30).all()


def test_fallbacks_keep_the_module_forward():
    """A gradient to keep (training), a weight of another dtype, or an input of another dtype: the module's own
    forward runs, and the gradient flows."""
    gen = torch.Generator().manual_seed(0)
    m = _module(64, torch.float32, gen)
    kernel = norm_kernel()
    x = torch.randn(4, 64, generator=gen, requires_grad=True)
    assert not kernel.takes(x, m.weight)
    assert not kernel.takes(x.detach().bfloat16(), m.weight)
    assert not kernel.takes(x.detach(), m.weight)  # the weight is a parameter that wants its gradient
    with torch.no_grad():
        assert kernel.takes(x.detach(), m.weight)
    fused = _module(64, torch.float32, torch.Generator().manual_seed(0))
    fused.forward = norm.types.MethodType(norm._fused_forward, fused)
    fused(x).sum().backward()
    assert x.grad is not None and fused.weight.grad is not None and fused.weight.grad.abs().sum() > 0


def test_decoder_norms_use_it_and_tokens_hold(tiny_ckpt, monkeypatch):
    """`phimm.load` gives the decoder's RMSNorms (two per layer and the final one) the kernel's forward, not the
    encoders'. In bf16 it runs, and the tiny model's greedy tokens are those with transformers' norms (logits
    within bf16 rounding); in fp32 transformers' forward runs (the text route stays bit-identical to the base)."""
    import phimm

    calls = []
    real = norm_kernel().rms_norm
    monkeypatch.setattr(norm_kernel(), "rms_norm", lambda *a: calls.append(a[0].shape) or real(*a))
    req = phimm.Request(prompt="<|user|>what color is the circle<|end|><|assistant|>")
    kw = dict(max_new_tokens=6, min_new_tokens=6, output_logits=True)
    fused = {dt: phimm.load(tiny_ckpt, dtype=dt, threads=1) for dt in ("bfloat16", "float32")}
    decoder = fused["bfloat16"].model.decoder
    used = [name for name, mod in fused["bfloat16"].model.hf.named_modules() if norm.uses_kernel(mod)]
    assert len(used) == 2 * len(decoder.layers) + 1
    assert all(name.startswith("model.layers.") or name == "model.norm" for name in used)
    got = {dt: p(req, **kw) for dt, p in fused.items()}
    assert calls and all(len(s) >= 2 for s in calls)  # the bf16 model's forwards ran the kernel
    n_bf16 = len(calls)
    monkeypatch.setattr(norm, "ENABLED", False)
    plain = {dt: phimm.load(tiny_ckpt, dtype=dt, threads=1) for dt in ("bfloat16", "float32")}
    assert not any(norm.uses_kernel(mod) for mod in plain["bfloat16"].model.hf.modules())
    want = {dt: p(req, **kw) for dt, p in plain.items()}
    assert len(calls) == n_bf16  # neither fp32 model nor the plain ones called it
    assert got["float32"].token_ids == want["float32"].token_ids
    assert all(torch.equal(a, b) for a, b in zip(got["float32"].logits, want["float32"].logits))
    assert got["bfloat16"].token_ids == want["bfloat16"].token_ids
    for a, b in zip(got["bfloat16"].logits, want["bfloat16"].logits):
        assert (a.float() - b.float()).abs().max().item() <= 0.02 * b.float().abs().max().item() + 1e-2
