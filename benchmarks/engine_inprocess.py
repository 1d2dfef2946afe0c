"""The engine's continuous batching against static batches with no HTTP: both in this process, on the requests of
`phimm bench serve` (the embedded model, 16 clients as threads), with the engine's counters and phase times
(PHIMM_PROFILE=1) per mode. It separates what the engine itself gains from what the server's processes cost.

    PYTHONPATH=. python benchmarks/engine_inprocess.py --requests-per-client 16 --modes continuous,static,continuous,static

Not a test: figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("PHIMM_PROFILE", "1")

import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=8)
    p.add_argument("--modes", default="continuous,static,continuous,static")
    p.add_argument("--prefill-delay-steps", type=int, default=None, help="EngineLimits.prefill_delay_steps")
    p.add_argument("--no-mixed-steps", action="store_true",
                   help="prefill arrivals in forwards of their own, not in the decode forward (phimm.step)")
    p.add_argument("--pad-waste", type=float, default=None, help="prefill buckets' padding limit (engine.PAD_WASTE)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    import phimm
    from phimm import engine as engine_mod
    from phimm.bench_serve import Record, StaticBatcher, make_items, run_clients
    from phimm.engine import EngineLimits
    from phimm.generation import GenerationOptions

    if args.pad_waste is not None:
        engine_mod.prefill_buckets.__defaults__ = (args.pad_waste,)
    limits = {"max_running": max(16, args.clients)}
    if args.prefill_delay_steps is not None:
        limits["prefill_delay_steps"] = args.prefill_delay_steps
    items = make_items("embedded", args.clients, args.requests_per_client)
    flat = [i for its in items for i in its]
    pipe = phimm.load(None, threads=1, limits=EngineLimits(**limits))
    if args.no_mixed_steps:
        pipe.engine.mixed_steps = False
    requests = {i.index: i.request() for i in flat}
    pipe([requests[i.index] for i in flat[:4]], max_new_tokens=2, do_sample=False)  # warm-up

    def continuous():
        @contextlib.contextmanager
        def sender():
            def send(item):
                prepared, route = pipe.prepare(requests[item.index])
                opts = GenerationOptions.from_kwargs(pipe.generation, max_new_tokens=item.tokens,
                                                     min_new_tokens=item.tokens, do_sample=False)
                pipe.engine.submit(prepared, route, opts, events=False).result()
                return Record(item.index, item.client, item.kind, start=0.0)
            yield send
        run_clients(items, sender, 0.01)

    def static():
        batcher = StaticBatcher(pipe, args.clients, do_sample=False)

        @contextlib.contextmanager
        def sender():
            def send(item):
                batcher.submit(requests[item.index], item.tokens).result()
                return Record(item.index, item.client, item.kind, start=0.0)
            yield send
        try:
            run_clients(items, sender, 0.01)
        finally:
            batcher.close()

    skip = {"running", "waiting", "kv_positions", "kv_bytes_peak"}
    for mode in args.modes.split(","):
        before = pipe.engine.stats()
        t = time.perf_counter()
        {"continuous": continuous, "static": static}[mode]()
        wall = time.perf_counter() - t
        after = pipe.engine.stats()
        diff = {k: round(v - before.get(k, 0), 3) for k, v in after.items()
                if isinstance(v, (int, float)) and k not in skip}
        ms_step = 1e3 * diff.get("decode_s", 0.0) / max(1, diff.get("steps", 0))
        print(f"{mode}: {len(flat) / wall:.1f} requests/s, wall {wall:.2f} s, {diff.get('steps')} decode steps "
              f"({ms_step:.2f} ms each), {diff.get('prefills')} prefills ({diff.get('prefill_s')} s); {diff}",
              flush=True)
    pipe.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
