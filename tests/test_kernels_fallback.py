"""Without phimm's native kernels (no compiler, a CPU without AVX-512, or `PHIMM_NO_NATIVE_KERNELS`), every path
falls back to PyTorch's and gives the same answers within bf16 rounding."""

from __future__ import annotations

from conftest import make_audio, make_image

import phimm
from phimm import kernels, norm
from phimm.quant import AdapterFactor, PackedWeight


def _requests():
    return [phimm.Request(prompt="<|user|>what color is the circle<|end|><|assistant|>"),
            phimm.Request(prompt="<|image|>what shape is the red one", images=[make_image(2)]),
            phimm.Request(prompt="<|audio|>transcribe the audio clip", audios=[make_audio(1, seconds=1.0)])]


def test_bf16_runtime_without_native_kernels(tiny_ckpt, monkeypatch):
    kw = dict(max_new_tokens=5, min_new_tokens=5, output_logits=True)
    native = phimm.load(tiny_ckpt, dtype="bfloat16", threads=1)
    with_kernels = [native(r, **kw) for r in _requests()] + native(_requests(), **kw)
    monkeypatch.setattr(kernels, "_loaded", {"int4": None, "attention": None, "norm": None, "gemv": None})
    plain = phimm.load(tiny_ckpt, dtype="bfloat16", threads=1)
    assert not any(norm.uses_kernel(m) for m in plain.model.hf.modules())
    without = [plain(r, **kw) for r in _requests()] + plain(_requests(), **kw)
    formats = [f for m in plain.model._targets.values() for pair in m._formatted.values() for f in pair]
    assert formats and not any(isinstance(f, AdapterFactor) for f in formats)  # oneDNN-packed factors instead
    assert all(isinstance(f, PackedWeight) for f in formats)
    for a, b in zip(with_kernels, without):
        assert a.error is None and b.error is None and len(a.token_ids) == len(b.token_ids) == 5
        scale = b.logits[0].float().abs().max().item()
        assert (a.logits[0].float() - b.logits[0].float()).abs().max().item() <= 0.03 * scale + 1e-2
