"""Soak: 1,000 mixed requests through one pipeline; prints resident memory at the start, middle and end.

    python scripts/soak.py [--model PATH] [--requests 1000] [--batch 8]

Not a unit test. Memory should stay flat once the first batches have warmed the allocator: a growth beyond a
small bound means something (caches, tensors kept in outputs) leaks per request.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np


def requests(n: int, seed: int = 0):
    """A deterministic stream of text / image / audio / image+audio requests with fresh media each time (so
    the encoder-output cache cannot hide a leak), one bad request in 25."""
    import phimm
    from phimm.toy.images import random_scene, render_scene

    rng = np.random.default_rng(seed)
    import random

    prng = random.Random(seed)
    for i in range(n):
        kind = i % 4
        parts = []
        if i % 25 == 24:
            parts.append({"type": "image", "image": b"not an image"})
        if kind in (1, 3):
            parts.append({"type": "image", "image": render_scene(random_scene(prng))})
        if kind in (2, 3):
            t = np.arange(int(rng.uniform(0.5, 2.0) * 16000)) / 16000
            wave = (0.3 * np.sin(2 * np.pi * rng.uniform(150, 400) * t)).astype(np.float32)
            parts.append({"type": "audio", "audio": (wave, 16000)})
        parts.append({"type": "text", "text": ["what color is the circle", "how many shapes are there",
                                               "Transcribe the audio clip into text.",
                                               "Answer the spoken question about the image."][kind]})
        yield phimm.Request(messages=[{"role": "user", "content": parts}])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    args = p.parse_args(argv)
    import phimm
    from phimm.bench import rss_mb

    pipe = phimm.load(args.model)
    stream = list(requests(args.requests))
    print(f"[soak] loaded: RSS {rss_mb():.1f} MB", flush=True)
    marks = {}
    served = errors = 0
    t0 = time.perf_counter()
    for start in range(0, len(stream), args.batch):
        outs = pipe(stream[start : start + args.batch], max_new_tokens=args.max_new_tokens)
        served += sum(o.error is None for o in outs)
        errors += sum(o.error is not None for o in outs)
        done = start + len(outs)
        for name, at in (("start", len(stream) // 10), ("middle", len(stream) // 2), ("end", len(stream))):
            if name not in marks and done >= at:
                gc.collect()
                marks[name] = rss_mb()
        if done % (len(stream) // 10 or 1) < args.batch:
            print(f"[soak] after {done:5d} requests: RSS {rss_mb():.1f} MB", flush=True)
    wall = time.perf_counter() - t0
    growth = marks["end"] - marks["start"]
    print(f"[soak] {served} served, {errors} typed errors, {wall:.1f} s; RSS start {marks['start']:.1f} MB, "
          f"middle {marks['middle']:.1f} MB, end {marks['end']:.1f} MB, growth {growth:+.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
