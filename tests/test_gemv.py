"""phimm's bf16 gemv kernel (`phimm/kernels/gemv_bf16.cpp`), the decode steps' LoRA factors, against the same
products computed in float64 from the same bf16 values."""

from __future__ import annotations

import pytest
import torch

from phimm.kernels import gemv_kernel

pytestmark = pytest.mark.skipif(gemv_kernel() is None,
                                reason="phimm's gemv kernel cannot be built here (no compiler or no AVX-512 BF16)")


@pytest.mark.parametrize("shape", [(64, 1024), (3075, 64), (5, 300), (256, 17), (1, 40)],
                         ids=lambda s: "N{}-K{}".format(*s))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 11, 32])
def test_gemv_matches_exact_products(shape, rows):
    """Any N (blocks of four and a remainder), any K (lines of 32 and a masked tail), 1 to 32 input rows (four at
    a time and a remainder), rows of a strided view: within one bf16 rounding of the exact product; with `out`,
    `out + alpha * x w^T` rounded once."""
    n, k = shape
    gen = torch.Generator().manual_seed(n * 31 + k + rows)
    kernel = gemv_kernel()
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16)
    wide = torch.randn(rows, k + 8, generator=gen).to(torch.bfloat16)
    for x in (wide[:, :k].contiguous(), wide[:, 8:]):
        exact = x.double() @ w.double().t()
        got = kernel.gemv(x, w, alpha=1.0)
        assert got.shape == (rows, n) and got.dtype == torch.bfloat16
        tol = 2 ** -8 * exact.abs() + 1e-6 * exact.abs().max()  # bf16 rounding, plus fp32 sums' order
        assert ((got.double() - exact).abs() <= tol).all()
        base = torch.randn(rows, n, generator=gen).to(torch.bfloat16)
        out = base.clone()
        assert kernel.gemv(x, w, out=out, alpha=0.75) is out
        want = base.double() + 0.75 * exact
        assert ((out.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-6 * want.abs().max()).all()


def test_gemv_threads_and_limits():
    """Two threads give what one gives, bit for bit; more rows than `MAX_ROWS`, fp32 or a non-contiguous weight
    are not taken."""
    gen = torch.Generator().manual_seed(0)
    kernel = gemv_kernel()
    w = torch.randn(1000, 256, generator=gen).to(torch.bfloat16)
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.gemv(x, w)
        torch.set_num_threads(2)
        two = kernel.gemv(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert kernel.takes(x, w) and kernel.takes(torch.randn(kernel.MAX_ROWS, 256).bfloat16(), w)
    assert not kernel.takes(torch.randn(kernel.MAX_ROWS + 1, 256).bfloat16(), w)
    assert not kernel.takes(x.float(), w.float())
    assert not kernel.takes(x, w.t().contiguous().t())


@pytest.mark.parametrize("rows", [1, 3, 32])
def test_lora_into_matches_the_two_steps(rows):
    """`lora_into` (both products and the add in one call) gives what the kernel's two steps give, bit for bit
    (A's product rounded to bf16 between them, the sum rounded once), and is declined for what it does not take."""
    gen = torch.Generator().manual_seed(rows)
    kernel = gemv_kernel()
    k, r, n = 1024, 64, 3072
    a = (torch.randn(r, k, generator=gen) / k ** 0.5).to(torch.bfloat16)
    b = (torch.randn(n, r, generator=gen) / r ** 0.5).to(torch.bfloat16)  # B non-zero
    x = torch.randn(rows, 1, k, generator=gen).to(torch.bfloat16)
    base = torch.randn(rows, 1, n, generator=gen).to(torch.bfloat16)
    fused = base.clone()
    assert kernel.lora_into(x, a, b, fused, 2.0)
    two = kernel.gemv(kernel.gemv(x, a), b, out=base.clone(), alpha=2.0)
    assert torch.equal(fused, two) and not torch.equal(fused, base)
    assert not kernel.lora_into(x, a, b[:, :-1].contiguous(), base.clone(), 2.0)   # ranks differ
    assert not kernel.lora_into(x, a, b, base.clone().float(), 2.0)                 # fp32 output
    assert not kernel.lora_into(torch.randn(kernel.MAX_ROWS + 1, k).bfloat16(), a, b,
                                torch.zeros(kernel.MAX_ROWS + 1, n).bfloat16(), 2.0)  # too many rows
