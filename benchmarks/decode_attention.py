"""Decode attention per layer: phimm's kernel (`phimm/kernels/decode_attention.cpp`) against PyTorch's flash
kernel as `phimm.attention` calls it ("flash") and against transformers' own sdpa call (`enable_gqa`), on the
same query, keys and values: one query position per row, keys and values as the cache holds them (views of
buffers with spare columns). "cold": a 64 MB buffer is read between calls, so K and V come from memory as in a
decode step (the layer's weights have just pushed them out of the caches); "warm": back to back. Median of the
calls over several layers' tensors; GB/s counts the K and V bytes each call reads.

    PYTHONPATH=. python benchmarks/decode_attention.py                      # Phi-4-multimodal's heads, 1,079 positions
    PYTHONPATH=. python benchmarks/decode_attention.py --positions 64,1079,4096 --batch 1,8

Not a test: figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import time

import torch


def _median(fn, ks, vs, flush, cold: bool, repeats: int) -> float:
    fn(ks[0], vs[0])
    times = []
    for _ in range(repeats):
        for k, v in zip(ks, vs):
            if cold:
                flush.max()
            t0 = time.perf_counter()
            fn(k, v)
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", default="24,8,128", help="query heads, KV heads, head dim")
    p.add_argument("--positions", default="1079", help="cached positions, comma-separated")
    p.add_argument("--batch", default="1", help="rows per call, comma-separated (all rows of full length)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=8, help="tensors cycled through (one per layer)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    from phimm import attention
    from phimm.kernels import attention_kernel

    torch.set_num_threads(args.threads)
    H, hkv, D = (int(x) for x in args.heads.split(","))
    dtype = getattr(torch, args.dtype)
    native = attention_kernel()
    if native is None:
        print("phimm's decode-attention kernel is not available here (see the log); only PyTorch's are timed")
    flush = torch.ones(64 << 20, dtype=torch.uint8)
    print(f"heads {H} / {hkv} x {D}, {args.dtype}, {args.threads} thread(s)")
    print(f"{'rows':>4} {'positions':>9} {'':5} {'phimm ms':>9} {'flash ms':>9} {'sdpa ms':>9} "
          f"{'phimm GB/s':>10} {'flash/phimm':>11} {'sdpa/phimm':>10}")
    for B in (int(x) for x in args.batch.split(",")):
        for T in (int(x) for x in args.positions.split(",")):
            ks = [torch.randn(B, hkv, T + 64, D).to(dtype)[:, :, :T] for _ in range(args.layers)]
            vs = [torch.randn(B, hkv, T + 64, D).to(dtype)[:, :, :T] for _ in range(args.layers)]
            q = torch.randn(B, 1, H, D).to(dtype).transpose(1, 2)
            kernels = {
                "phimm": lambda k, v: attention.decode_attention(q, k, v, None, kernel="phimm"),
                "flash": lambda k, v: attention.decode_attention(q, k, v, None, kernel="flash"),
                "sdpa": lambda k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            }
            nbytes = 2 * B * hkv * T * D * ks[0].element_size()
            for cold in (True, False):
                t = {name: _median(fn, ks, vs, flush, cold, args.repeats) for name, fn in kernels.items()}
                print(f"{B:>4} {T:>9} {'cold' if cold else 'warm':5} {t['phimm'] * 1e3:9.3f} {t['flash'] * 1e3:9.3f} "
                      f"{t['sdpa'] * 1e3:9.3f} {nbytes / t['phimm'] / 1e9:10.1f} {t['flash'] / t['phimm']:11.2f} "
                      f"{t['sdpa'] / t['phimm']:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
