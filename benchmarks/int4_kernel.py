"""phimm's int4 CPU kernel against torch's (`aten._weight_int4pack_mm_for_cpu`) and the int8 format on the same
weights, one weight shape at a time: time per call for each row count, and the weight bytes read per second.
Several copies of each weight are cycled so every call reads its weights from memory, not from the caches.

    PYTHONPATH=. python benchmarks/int4_kernel.py                         # the published widths' shapes
    PYTHONPATH=. python benchmarks/int4_kernel.py --shapes 8192x3072 --rows 1,4,16,256,1024

Not a test: figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import time

import torch


def _best(fn, weights, repeats: int) -> float:
    fn(weights[0])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in weights:
            fn(w)
        best = min(best, (time.perf_counter() - t0) / len(weights))
    return best


def main(argv=None) -> int:
    from phimm.quant import Int4Weight, Int8Weight

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="8192x3072,16384x3072,3072x8192,5120x3072,200064x3072",
                   help="output x input channels, comma-separated")
    p.add_argument("--rows", default="1,4,16", help="rows of the input (batch x positions), comma-separated")
    p.add_argument("--min-bytes", type=float, default=600e6, help="int4 bytes of the copies cycled per shape")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"[int4] torch {torch.__version__}, {args.threads} thread(s); ms per call (GB/s of weights read)")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        copies = max(1, min(16, int(args.min_bytes // (n * k / 2))))
        dense = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(copies)]
        formats = {"aten int4": [Int4Weight(w, None, kernel="aten") for w in dense],
                   "phimm int4": [Int4Weight(w, None, kernel="phimm") for w in dense],
                   "int8": [Int8Weight(w, None) for w in dense]}
        del dense
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            times = {name: _best(lambda f: f(x), fmts, args.repeats) for name, fmts in formats.items()}
            cells = "  ".join(f"{name} {t * 1e3:7.2f} ms ({fmts[0].nbytes / t / 1e9:4.1f} GB/s)"
                              for (name, t), fmts in zip(times.items(), formats.values()))
            print(f"{n:>6} x {k:<5} rows {rows:>4}: {cells}  | phimm int4 over aten int4 "
                  f"{times['aten int4'] / times['phimm int4']:.2f}x, over int8 {times['int8'] / times['phimm int4']:.2f}x",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
