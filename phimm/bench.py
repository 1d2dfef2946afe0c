"""`phimm bench`: phimm against transformers + peft on the same random weights, in one process, interleaved.

Workloads: 16 mixed requests (4 each of text / image / audio / image + audio), single requests per route, batch-1
text decode against the measured memory bandwidth, and int8 and int4 against bf16. Writes a JSON file and a Markdown
table. Not a test: figures depend on the machine; ratios are what to compare.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIZES = {
    # CI smoke run: seconds
    "quick": dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384, vision_hidden=32, vision_layers=1,
                  audio_hidden=32, audio_blocks=1, lora=8, vocab=None, image=(320, 240), audio_s=1.0, new=8),
    # the reference measurement: ~209M parameters
    "209m": dict(hidden=1024, layers=12, heads=16, kv_heads=4, intermediate=3584, vision_hidden=256,
                 vision_layers=4, audio_hidden=256, audio_blocks=4, lora=64, vocab=32000, image=(640, 480),
                 audio_s=4.0, new=32, ckpt_dtype=torch.bfloat16),
    # Phi-4-multimodal's published widths (24 query / 8 KV heads of 128, SigLIP 1152 x 27, conformer 1024 x 24,
    # LoRA r=256) with 2 decoder layers: long-context decode attention at full width (`--decode-attention`)
    "full-width": dict(hidden=3072, layers=2, heads=24, kv_heads=8, intermediate=8192, vision_hidden=1152,
                       vision_layers=27, audio_hidden=1024, audio_blocks=24, lora=256, vocab=200064,
                       image=(640, 480), audio_s=4.0, new=16, ckpt_dtype=torch.bfloat16,
                       mixed=False, decode_attention=False, route_repeats=2),
    # the published model's size (32 decoder layers): about 11 GB of bf16 weights, for machines with the memory
    "full": dict(hidden=3072, layers=32, heads=24, kv_heads=8, intermediate=8192, vision_hidden=1152,
                 vision_layers=27, audio_hidden=1024, audio_blocks=24, lora=256, vocab=200064,
                 image=(640, 480), audio_s=4.0, new=8, ckpt_dtype=torch.bfloat16,
                 mixed=False, decode_attention=False, route_repeats=1),
}
# (mixed=False: the 16 mixed requests and the fp32 row check are measured at 209m; at the published widths each
# image alone takes SigLIP's 27 layers about a minute on one core)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_bandwidths(mb: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth (GB/s) of this process's threads, three ways over buffers far larger than the caches, best
    of `repeats` each: `sum` (torch.sum of fp32: the buffer read once), `dot` (a STREAM-style read through BLAS:
    x . x reads the buffer once), `copy` (STREAM's copy: read one buffer, write another, counted as both). `best`
    is the highest: the limit that decode figures are compared with."""
    n = mb * 1024 * 1024 // 4
    x = torch.ones(n, dtype=torch.float32)
    y = torch.empty_like(x)
    kernels = {"sum": (lambda: x.sum(), 4 * n), "dot": (lambda: torch.dot(x, x), 4 * n),
               "copy": (lambda: y.copy_(x), 8 * n)}
    out = {}
    for name, (fn, nbytes) in kernels.items():
        fn()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[name] = nbytes / best / 1e9
    out["best"] = max(out.values())
    return out


def measure_bandwidth(mb: int = 1024, repeats: int = 5) -> float:
    """The best of `measure_bandwidths` (GB/s)."""
    return measure_bandwidths(mb, repeats)["best"]


def checkpoint_bytes(ckpt: Path, dtype: torch.dtype) -> int:
    """Bytes of a checkpoint's tensors (model files and adapter folders) with the floating ones in `dtype`, from
    the files' headers: what loading it in that dtype must hold at least."""
    import math

    from safetensors import safe_open

    from .formats.shards import ST_DTYPES

    total = 0
    for f in sorted(Path(ckpt).glob("*.safetensors")) + sorted(Path(ckpt).glob("*-lora/*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                stored = ST_DTYPES[sl.get_dtype()]
                held = dtype if stored.is_floating_point else stored
                total += math.prod(sl.get_shape()) * held.itemsize
    return total


def _held_tensors(module: torch.nn.Module):
    """Every tensor `module` holds: its modules' parameters and buffers, and the tensors their other attributes
    keep (lists and dicts of adapter factors, weight-format objects such as `PackedWeight` with their packed
    copies), each object visited once."""
    seen: set[int] = set()

    def visit(obj, depth: int):
        if id(obj) in seen or depth > 8:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, torch.nn.Module):
            return  # reached through module.modules()
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                yield from visit(x, depth + 1)
        elif isinstance(obj, dict):
            for x in obj.values():
                yield from visit(x, depth + 1)
        elif type(obj).__module__.split(".")[0] in ("phimm", "adapters") and hasattr(obj, "__dict__"):
            yield from visit(vars(obj), depth + 1)  # a weight format, an adapter's formatted pair

    for mod in module.modules():
        seen.add(id(mod))
        for value in vars(mod).values():
            yield from visit(value, 1)


def held_weight_bytes(module: torch.nn.Module) -> dict[str, int]:
    """The bytes of the tensors `module` holds, by where they live: `anonymous` (copies in the process's own
    memory: packed or converted weights, each storage once), `file_resident` (pages of memory-mapped checkpoint
    files that this process has read, each page once: `/proc/self/pagemap`), `file_mapped` (all the mapped bytes,
    read or not). `held` = anonymous + file_resident: what the weights occupy in memory, unlike an RSS
    difference, which also counts the allocator's free lists, kernel caches (oneDNN's) and Python objects."""
    import mmap

    from .formats.shards import file_mappings, resident_pages

    maps = file_mappings()
    starts = [a for a, _ in maps]
    anonymous = mapped = 0
    storages: set[int] = set()
    pages: set[int] = set()
    pagemap_ok = True
    for t in _held_tensors(module):
        if t.device.type != "cpu":
            continue
        try:
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except (NotImplementedError, RuntimeError):  # an opaque (oneDNN-packed) tensor: its own memory
            if id(t) not in storages:
                storages.add(id(t))
                anonymous += t.numel() * t.element_size()
            continue
        if ptr in storages or nbytes == 0:
            continue
        storages.add(ptr)
        k = bisect.bisect_right(starts, ptr) - 1
        if k >= 0 and ptr + nbytes <= maps[k][1]:
            mapped += nbytes
            got = resident_pages(ptr, ptr + nbytes)
            if got is None:
                pagemap_ok = False
            else:
                pages |= got
        else:
            anonymous += nbytes
    resident = len(pages) * mmap.PAGESIZE if pagemap_ok else mapped
    return {"anonymous": anonymous, "file_resident": resident, "file_mapped": mapped,
            "held": anonymous + resident}


def trim_memory() -> None:
    """Give freed heap memory back to the system (glibc), so that RSS shows what is held, not what was used."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def warm_up_code_paths() -> None:
    """One short request of each route on the embedded model, then unloaded: the modules and one-time runtime
    state that a first image or audio request brings in are in the process before a memory figure's baseline."""
    import phimm

    from .types import Request

    from .toy.examples import read_examples

    seen = set()
    pipe = phimm.load(None)
    try:
        for text, image, audio in read_examples():
            if (image is None, audio is None) in seen:
                continue
            seen.add((image is None, audio is None))
            parts = [{"type": k, k: v} for k, v in (("image", image), ("audio", audio)) if v is not None]
            pipe(Request(messages=[{"role": "user", "content": parts + [{"type": "text", "text": text}]}]),
                 max_new_tokens=2)
    finally:
        pipe.close()
    del pipe


def make_checkpoint(size: str, root: Path) -> Path:
    from .testing import make_tiny_checkpoint

    spec = SIZES[size]
    ckpt = root / f"bench-{size}"
    dtype = spec.get("ckpt_dtype", torch.float32)
    if (ckpt / "config.json").is_file() and (ckpt / "speech-lora").is_dir():
        written = json.loads((ckpt / "config.json").read_text()).get("dtype") or json.loads(
            (ckpt / "config.json").read_text()).get("torch_dtype")
        if written == str(dtype).removeprefix("torch."):
            return ckpt  # (a checkpoint of another dtype, as the published one's, is written again)
    overrides = {k: spec[k] for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vision_hidden",
                                      "vision_layers", "audio_hidden", "audio_blocks")}
    if spec["vocab"]:
        overrides["vocab_size"] = spec["vocab"]
    make_tiny_checkpoint(ckpt, seed=0, lora_ranks={"vision": spec["lora"], "speech": spec["lora"]},
                         dtype=dtype, **overrides)
    return ckpt


def decode_attention_routes(pipe, spec, new: int, repeats: int = 3) -> dict:
    """Batch-1 decode tokens/s of a text and an image request (~1,080 cached positions) with the decoder on
    phimm's decode attention (`phimm.attention`) and on transformers' sdpa, switched on the same loaded model and
    interleaved, so the ratios come from one process under one load: tokens/s best of `repeats` per cell, ratios
    the median over repeats of back-to-back pairs. The text request also runs on the image route's adapter
    ("text+vision"): image / text+vision is the cost of the cached positions alone, image / text adds the vision
    LoRA's."""
    import dataclasses

    from . import attention

    reqs = workload(spec)
    routes = {kind: to_request(next(r for r in reqs if r[0] == kind)) for kind in ("text", "image")}
    routes = {"text": routes["text"], "text+vision": dataclasses.replace(routes["text"], adapter=ADAPTER["image"]),
              "image": routes["image"]}
    for req in routes.values():  # warm-up: packed weights, the image's features cached
        pipe(req, max_new_tokens=2)
    rates = {impl: {kind: [] for kind in routes} for impl in ("phimm", "sdpa")}
    positions = {}
    try:
        for _ in range(repeats):
            for impl in rates:
                attention.use_for_decoder(pipe.model.hf, impl)
                for kind, req in routes.items():
                    o = pipe(req, max_new_tokens=new, min_new_tokens=new)
                    rates[impl][kind].append(o.tokens_per_s)
                    positions[kind] = o.prompt_tokens
    finally:
        attention.use_for_decoder(pipe.model.hf, "phimm" if attention.ENABLED else "sdpa")
    out = {"positions": positions, "repeats": repeats, "new_tokens": new}
    for impl, by_kind in rates.items():
        # ratios: the median over repeats of image / text measured back to back (a busy core moves the best-of
        # figures of different repeats apart)
        each = [i / t for i, t in zip(by_kind["image"], by_kind["text"])]
        each_v = [i / t for i, t in zip(by_kind["image"], by_kind["text+vision"])]
        out[impl] = {"text_tok_s": max(by_kind["text"]), "text_vision_tok_s": max(by_kind["text+vision"]),
                     "image_tok_s": max(by_kind["image"]), "image_over_text": float(np.median(each)),
                     "image_over_text_vision": float(np.median(each_v)), "image_over_text_each": each,
                     "image_over_text_vision_each": each_v}
    out["image_speedup"] = out["phimm"]["image_tok_s"] / out["sdpa"]["image_tok_s"]
    out["text_speedup"] = out["phimm"]["text_tok_s"] / out["sdpa"]["text_tok_s"]
    print(f"[bench] decode attention: {out}", flush=True)
    return out


def attention_in_decode_steps(pipe, positions=(19, 1079), steps: int = 16, repeats: int = 3) -> dict:
    """Decode steps of one row straight through the model (base weights, no engine) after `n` cached positions,
    with the decoder's attention function timed inside them: ms per step and ms of it in attention, for phimm's
    decode attention (its default kernel, "flash" and "matmul") and for sdpa. Best of `repeats`."""
    import functools

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from . import attention
    from .cache import PreallocatedCache

    spent = [0.0]

    def timed(fn):
        def forward(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent[0] += time.perf_counter() - t
            return out
        return forward

    impls = {"phimm": attention.phimm_attention_forward,
             "phimm-flash": functools.partial(attention.phimm_attention_forward, kernel="flash"),
             "phimm-matmul": functools.partial(attention.phimm_attention_forward, kernel="matmul"),
             "sdpa": sdpa_attention_forward}
    for impl, fn in impls.items():
        AttentionInterface.register(f"{impl}-timed", timed(fn))
        AttentionMaskInterface.register(f"{impl}-timed", sdpa_mask)
    model = pipe.model
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    config = model.hf.config
    before = config._attn_implementation
    best: dict = {impl: {n: (float("inf"), float("inf")) for n in positions} for impl in impls}
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                for impl in impls:
                    config._attn_implementation = {"": f"{impl}-timed"}
                    for n in positions:
                        cache = PreallocatedCache(layers, n + steps + 1)
                        embeds = torch.randn(1, n, hidden, dtype=model.dtype) * 0.02
                        model.decode(embeds, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None], cache)
                        spent[0] = 0.0
                        t = time.perf_counter()
                        for i in range(steps):
                            x = torch.randn(1, 1, hidden, dtype=model.dtype) * 0.02
                            h = model.decode(x, torch.ones(1, n + i + 1, dtype=torch.long), torch.tensor([[n + i]]),
                                             cache)
                            model.logits(h[:, -1])
                        step, att = (time.perf_counter() - t) / steps * 1e3, spent[0] / steps * 1e3
                        best[impl][n] = (min(best[impl][n][0], step), min(best[impl][n][1], att))
    finally:
        config._attn_implementation = {"": before}
    out = {impl: {str(n): {"step_ms": s, "attention_ms": a, "attention_ms_per_layer": a / layers}
                  for n, (s, a) in by_n.items()} for impl, by_n in best.items()}
    out["layers"] = layers
    print(f"[bench] attention in decode steps: {out}", flush=True)
    return out


def attention_kernel() -> str:
    from . import attention

    return attention.KERNEL


def decode_attention_markdown(d: dict, command: str, config: str) -> str:
    p = d["positions"]
    lines = [f"Command: `{command}`", "", config, "",
             f"| decoder attention | text, base model ({p['text']} positions) | text, vision adapter | image, vision "
             f"adapter ({p['image']} positions) | image / text (median of pairs) | image / text on the vision "
             f"adapter (median of pairs) |",
             "|---|---|---|---|---|---|"]
    for impl, label in (("phimm", "phimm (`phimm.attention`)"), ("sdpa", "transformers sdpa")):
        v = d[impl]
        lines.append(f"| {label} | {v['text_tok_s']:.2f} tok/s | {v['text_vision_tok_s']:.2f} tok/s | "
                     f"{v['image_tok_s']:.2f} tok/s | {v['image_over_text']:.2f} | {v['image_over_text_vision']:.2f} |")
    lines.append(f"| phimm / sdpa | {d['text_speedup']:.2f}x | | {d['image_speedup']:.2f}x | | |")
    a = d.get("in_steps")
    if a:
        lines += ["", f"Decode steps straight through the model ({a['layers']} decoder layers, base weights), "
                  "attention timed inside them (best of 3):", "",
                  "| decoder attention | cached positions | ms per step | ms in attention | per layer |",
                  "|---|---|---|---|---|"]
        for impl, label in (("phimm", f"phimm ({attention_kernel()})"), ("phimm-flash", "phimm (flash)"),
                            ("phimm-matmul", "phimm (matmul)"), ("sdpa", "sdpa")):
            for n, v in a[impl].items():
                lines.append(f"| {label} | {n} | {v['step_ms']:.1f} | {v['attention_ms']:.2f} | "
                             f"{v['attention_ms_per_layer']:.3f} |")
    return "\n".join(lines) + "\n"


def checkpoint_parameters(ckpt: Path) -> int:
    """Parameters in a checkpoint's model files (the adapters' folders not counted), read from their headers."""
    import math

    from safetensors import safe_open

    n = 0
    for f in Path(ckpt).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


def run_decode_attention(args) -> dict:
    """`--decode-attention`: only `decode_attention_routes`, on the size's checkpoint."""
    import phimm

    torch.set_num_threads(args.threads)
    spec = dict(SIZES[args.size])
    if args.new_tokens:
        spec["new"] = args.new_tokens
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    print(f"[bench] size={args.size} dtype={args.dtype} threads={args.threads} (decode attention)", flush=True)
    t = time.perf_counter()
    ckpt = make_checkpoint(args.size, root)
    print(f"[bench] checkpoint {ckpt} ({time.perf_counter() - t:.0f} s)", flush=True)
    pipe = phimm.load(ckpt, dtype=args.dtype, threads=args.threads)
    n_params = checkpoint_parameters(ckpt)
    results = {"config": {"size": args.size, "dtype": args.dtype, "threads": args.threads, "parameters": n_params,
                          "torch": torch.__version__},
               "decode_attention": decode_attention_routes(pipe, spec, spec["new"], repeats=max(args.repeats, 3))}
    results["decode_attention"]["in_steps"] = attention_in_decode_steps(pipe)
    results["memory"] = {"peak_rss_mb": peak_rss_mb()}
    return results


def mixed_and_rows(args, pipe, ref, ckpt, reqs, new: int, results: dict) -> None:
    """The 16 mixed requests: phimm's one call against the reference one at a time and per modality, interleaved
    `args.repeats` times after one untimed call of each, phimm's media feature cache off (`speedup`: best against
    best; `speedup_median`: the median of each repeat's ratio); then every row of phimm's batch against the same
    request alone, in fp32."""
    import phimm

    times = {"phimm": [], "one_at_a_time": [], "per_modality": []}
    # one untimed call of each batched strategy first: a library's first batch of new shapes pays one-time set-up
    # (kernels for the shapes, allocator growth) that a long-running server pays once. (The one-at-a-time
    # requests' shapes ran before, in the memory phase.)
    pipe([to_request(r) for r in reqs], max_new_tokens=2)
    for k in ADAPTER:
        ref.run([r for r in reqs if r[0] == k], 2)
    cache, capacity = pipe.model.feature_cache, pipe.model.feature_cache.capacity
    for rep in range(args.repeats):
        # no media features kept from earlier calls or shared within the call: phimm encodes every request's
        # media, as the reference does
        cache.clear()
        cache.capacity = 0
        try:
            t, outs = timed(lambda: pipe([to_request(r) for r in reqs], max_new_tokens=new, min_new_tokens=new))
        finally:
            cache.capacity = capacity
        times["phimm"].append(t)
        t, _ = timed(lambda: [ref.run([r], new) for r in reqs])
        times["one_at_a_time"].append(t)
        t, _ = timed(lambda: [ref.run([r for r in reqs if r[0] == k], new) for k in ADAPTER])
        times["per_modality"].append(t)
        print(f"[bench] mixed rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    best = {k: min(v) for k, v in times.items()}
    ref_best = min(best["one_at_a_time"], best["per_modality"])
    each = [min(o, m) / p for p, o, m in zip(times["phimm"], times["one_at_a_time"], times["per_modality"])]
    total_tokens = 16 * new
    results["mixed"] = {
        "phimm_s": best["phimm"], "reference_one_at_a_time_s": best["one_at_a_time"],
        "reference_per_modality_s": best["per_modality"], "reference_best_s": ref_best,
        "speedup": ref_best / best["phimm"], "speedup_each": each, "speedup_median": float(np.median(each)),
        "phimm_requests_per_s": 16 / best["phimm"],
        "phimm_tokens_per_s": total_tokens / best["phimm"], "reference_tokens_per_s": total_tokens / ref_best,
    }

    # ---- every row equals the same request alone (fp32) ----
    check = phimm.load(ckpt, dtype="float32", threads=args.threads)
    check_new = min(new, 8)
    batch = check([to_request(r) for r in reqs], max_new_tokens=check_new, output_logits=True)
    match, worst = 0, 0.0
    for r, b in zip(reqs, batch):
        alone = check(to_request(r), max_new_tokens=check_new, output_logits=True)
        match += int(alone.token_ids == b.token_ids)
        worst = max(worst, (alone.logits[0] - b.logits[0]).abs().max().item())
    results["mixed"]["rows_match"] = match == len(reqs)
    results["mixed"]["rows_matching"] = f"{match}/{len(reqs)}"
    results["mixed"]["max_first_logit_diff_fp32"] = worst
    del check


def adapter_bytes(model, name: str | None) -> int:
    """Bytes of one adapter's A and B over all its layers: what a decode step on its route reads besides the base."""
    if name is None:
        return 0
    from adapters import LoraLinear

    i = model.adapter_index(name)
    total = 0
    for mod in model.hf.modules():
        if isinstance(mod, LoraLinear) and i < len(mod.lora_a) and mod.lora_a[i] is not None:
            total += sum(t.numel() * t.element_size() for t in (mod.lora_a[i], mod.lora_b[i]))
    return total


def route_decode(pipe, first: dict, new: int, base_bytes: int, bandwidth: float, reps: int = 3) -> dict:
    """Batch-1 decode tokens/s of each route (its media encoded once beforehand; best of `reps`), with the bytes a
    step reads (the base's, plus the route's adapter) as a share of `bandwidth`. The routes take turns within each
    repeat, and `over_text` is the median over repeats of the route's rate over the text route's in the same
    repeat (a machine whose bandwidth drifts moves best-of figures taken minutes apart)."""
    reqs = {kind: to_request(r) for kind, r in first.items()}
    for req in reqs.values():
        pipe(req, max_new_tokens=2)  # media features cached: decode alone is timed
    rates = {kind: [] for kind in reqs}
    for _ in range(reps):
        for kind, req in reqs.items():
            rates[kind].append(pipe(req, max_new_tokens=new, min_new_tokens=new).tokens_per_s)
    out = {}
    for kind, rs in rates.items():
        nbytes = base_bytes + adapter_bytes(pipe.model, ADAPTER[kind])
        out[kind] = {"decode_tok_s": max(rs), "bytes_per_token": nbytes,
                     "bandwidth_fraction": nbytes * max(rs) / (bandwidth * 1e9),
                     "over_text": float(np.median([r / t for r, t in zip(rs, rates["text"])])),
                     "over_text_each": [r / t for r, t in zip(rs, rates["text"])]}
    print(f"[bench] route decode: {out}", flush=True)
    return out


def single_routes(pipe, ref, first: dict, new: int, base_bytes: int, bandwidth: float, reps: int = 2) -> dict:
    """Each route alone, phimm and the reference interleaved, the routes taking turns within each repeat: time to
    first token (phimm's media feature cache emptied before each, so both encode the media every time), decode
    tokens/s (best of `reps`), phimm's bytes per token against `bandwidth`, and `decode_over_text`: the median
    over repeats of phimm's decode rate on the route over its text rate in the same repeat."""
    runs = {kind: {"p_ttft": [], "p_dec": [], "r_ttft": [], "r_dec": []} for kind in first}
    for _ in range(reps):
        for kind, r in first.items():
            m = runs[kind]
            pipe.model.feature_cache.clear()
            o = pipe(to_request(r), max_new_tokens=new, min_new_tokens=new)
            m["p_ttft"].append(o.ttft_s)
            m["p_dec"].append(o.tokens_per_s)
            # the reference's decode from its own token times (a second run's TTFT taken off would leave the
            # difference of two media encodings, seconds apart at the published widths)
            times = TokenTimes()
            t0 = time.perf_counter()
            ref.run([r], new, streamer=times)
            m["r_ttft"].append(times.times[0] - t0)
            m["r_dec"].append((len(times.times) - 1) / max(times.times[-1] - times.times[0], 1e-9))
    single = {}
    for kind, m in runs.items():
        nbytes = base_bytes + adapter_bytes(pipe.model, ADAPTER[kind])
        p_dec, r_dec = max(m["p_dec"]), max(m["r_dec"])
        each = [p / t for p, t in zip(m["p_dec"], runs["text"]["p_dec"])]
        single[kind] = {"phimm_ttft_s": min(m["p_ttft"]), "reference_ttft_s": min(m["r_ttft"]),
                        "phimm_decode_tok_s": p_dec, "reference_decode_tok_s": r_dec,
                        "ttft_ratio": min(m["p_ttft"]) / min(m["r_ttft"]),
                        "decode_ratio": r_dec / p_dec,  # phimm time per token / reference time per token
                        "bytes_per_token": nbytes, "bandwidth_fraction": nbytes * p_dec / (bandwidth * 1e9),
                        "decode_over_text": float(np.median(each)), "decode_over_text_each": each}
        print(f"[bench] single {kind}: {single[kind]}", flush=True)
    return single


def workload(spec, seed: int = 0):
    """16 requests: 4 each of text, image, audio, image + audio (chat-formatted prompts, raw placeholders)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = spec["image"]
    reqs = []
    for i in range(4):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        t = np.arange(int(spec["audio_s"] * 16000)) / 16000
        aud = ((0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t)) + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)
        reqs.append(("text", f"<|user|>what color is the circle number {i}<|end|><|assistant|>", [], []))
        reqs.append(("image", "<|user|><|endoftext10|>what shape is the red one<|end|><|assistant|>", [img], []))
        reqs.append(("audio", "<|user|><|endoftext11|>Transcribe the audio clip into text.<|end|><|assistant|>", [],
                     [(aud, 16000)]))
        reqs.append(("image+audio", "<|user|><|endoftext10|><|endoftext11|>Answer the spoken question about the "
                     "image.<|end|><|assistant|>", [img], [(aud, 16000)]))
    return reqs


ADAPTER = {"text": None, "image": "vision", "audio": "speech", "image+audio": "vision"}


def reference_model(ckpt: Path, dtype: torch.dtype):
    """The reference implementation of a checkpoint in transformers' layout: `Phi4MultimodalForCausalLM` with
    every `{name}-lora/` folder loaded as a peft adapter of that name, in eval mode. SigLIP is made bidirectional,
    as it is (transformers' vision attention says causal: see `phimm.model.make_vision_attention_bidirectional`)."""
    from peft import PeftModel
    from transformers import Phi4MultimodalForCausalLM

    from .model import make_vision_attention_bidirectional

    ckpt = Path(ckpt)
    base = Phi4MultimodalForCausalLM.from_pretrained(str(ckpt), dtype=dtype).eval()
    make_vision_attention_bidirectional(base)
    names = sorted(p.name[: -len("-lora")] for p in ckpt.iterdir() if p.name.endswith("-lora"))
    model = PeftModel.from_pretrained(base, str(ckpt / f"{names[0]}-lora"), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(ckpt / f"{name}-lora"), adapter_name=name)
    return model.eval()


class Reference:
    """transformers' Phi4MultimodalForCausalLM + peft adapters, switched by hand (`set_adapter`)."""

    def __init__(self, ckpt: Path | None, dtype: torch.dtype = torch.float32, *, model=None, processor=None,
                 device: str | torch.device = "cpu"):
        """From a checkpoint folder, or (`ckpt=None`) around a peft model and processor already built."""
        from transformers import Phi4MultimodalProcessor

        self.model = model if model is not None else reference_model(ckpt, dtype)
        self.processor = processor if processor is not None else Phi4MultimodalProcessor.from_pretrained(str(ckpt))
        self.processor.tokenizer.padding_side = "left"
        self.device = device

    def _ctx(self, adapter):
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def inputs(self, batch):
        """The processor's inputs for requests `(kind, prompt, images, audios)`, left-padded, on the device."""
        kwargs = {}
        images = [i for r in batch for i in r[2]]
        audios = [a for r in batch for a, _ in r[3]]
        if images:
            kwargs["images"] = images
        if audios:
            kwargs["audio"] = audios
            kwargs["sampling_rate"] = 16000
        out = self.processor(text=[r[1] for r in batch], return_tensors="pt", padding=True, **kwargs)
        return out.to(self.device) if torch.device(self.device).type != "cpu" else out

    def run(self, batch, new_tokens: int, streamer=None):
        """One generate call for requests of one route (as its users batch them); `streamer`: transformers'
        streamer protocol (`put`, `end`), e.g. `TokenTimes`."""
        inputs = self.inputs(batch)
        with torch.inference_mode(), self._ctx(ADAPTER[batch[0][0]]):
            out = self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      streamer=streamer)
        return out[:, inputs["input_ids"].shape[1]:]


class TokenTimes:
    """A streamer for `generate` that records when each step's tokens arrive (the first `put` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt = True

    def put(self, value) -> None:
        if self._prompt:
            self._prompt = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def to_request(r):
    import phimm

    return phimm.Request(prompt=r[1], images=r[2], audios=r[3])


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(args) -> dict:
    import phimm

    torch.set_num_threads(args.threads)
    spec = dict(SIZES[args.size])
    if args.new_tokens:
        spec["new"] = args.new_tokens
    new = spec["new"]
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    print(f"[bench] size={args.size} dtype={args.dtype} threads={args.threads}", flush=True)
    ckpt = make_checkpoint(args.size, root)
    bandwidths = measure_bandwidths()
    bandwidth = bandwidths["best"]
    print(f"[bench] bandwidth {bandwidth:.1f} GB/s (" + ", ".join(f"{k} {v:.1f}" for k, v in bandwidths.items()
                                                            if k != "best") + ")", flush=True)
    reqs = workload(spec)
    first = {kind: next(r for r in reqs if r[0] == kind) for kind in ADAPTER}

    # resident memory: after loading and one request of each route (feature caches emptied, freed heap returned);
    # both libraries imported first, and one request of each route run on the embedded model, so that neither
    # figure holds code or one-time runtime set-up (the media processors, the encoders' kernels) that the first
    # requests bring in: what is left is what the loaded model holds
    import peft  # noqa: F401
    from transformers import Phi4MultimodalForCausalLM  # noqa: F401

    warm_up_code_paths()
    trim_memory()
    rss0 = rss_mb()
    pipe = phimm.load(ckpt, dtype=args.dtype, threads=args.threads)
    for r in first.values():
        pipe(to_request(r), max_new_tokens=2)
    pipe.model.feature_cache.clear()
    trim_memory()
    rss_phimm = rss_mb() - rss0
    held_phimm = held_weight_bytes(pipe.model)
    rss1 = rss_mb()
    ref = Reference(ckpt, dtype)
    for r in first.values():
        ref.run([r], 2)
    trim_memory()
    rss_ref = rss_mb() - rss1
    held_ref = held_weight_bytes(ref.model)
    n_params = sum(p.numel() for p in ref.model.get_base_model().parameters())
    ckpt_mb = checkpoint_bytes(ckpt, dtype) / 2**20
    results: dict = {"size": args.size,
                     "config": {"size": args.size, "dtype": args.dtype, "threads": args.threads, "new_tokens": new,
                                "parameters": n_params, "image": spec["image"], "audio_s": spec["audio_s"],
                                "lora_rank": spec["lora"], "torch": torch.__version__},
                     "bandwidth": bandwidths, "bandwidth_gbs": bandwidth,
                     "memory": {"phimm_weights_rss_mb": rss_phimm, "reference_weights_rss_mb": rss_ref,
                                "checkpoint_mb": ckpt_mb, "phimm_over_checkpoint": rss_phimm / ckpt_mb,
                                "reference_over_checkpoint": rss_ref / ckpt_mb,
                                "measured": "RSS after loading and one request of each route",
                                # the weights themselves, counted tensor by tensor (held_weight_bytes)
                                "phimm_weights_held_mb": held_phimm["held"] / 2**20,
                                "reference_weights_held_mb": held_ref["held"] / 2**20,
                                "phimm_held_over_checkpoint": held_phimm["held"] / 2**20 / ckpt_mb,
                                "reference_held_over_checkpoint": held_ref["held"] / 2**20 / ckpt_mb,
                                "phimm_held": {k: v / 2**20 for k, v in held_phimm.items()},
                                "reference_held": {k: v / 2**20 for k, v in held_ref.items()}}}
    print(f"[bench] memory {results['memory']}", flush=True)
    if spec.get("mixed", True):
        mixed_and_rows(args, pipe, ref, ckpt, reqs, new, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    weight_bytes = decode_weight_bytes(pipe.model)
    results["single"] = single_routes(pipe, ref, first, new, weight_bytes, bandwidth,
                                      reps=spec.get("route_repeats", 2))

    # ---- batch-1 decode against the memory bandwidth ----
    dec = max(pipe("<|user|>hello<|end|><|assistant|>", max_new_tokens=2 * new, min_new_tokens=2 * new).tokens_per_s
              for _ in range(2))
    results["decode_bandwidth_fraction"] = weight_bytes * dec / (bandwidth * 1e9)
    results["decode_tok_s"] = dec
    results["decode_weight_bytes"] = weight_bytes
    if spec.get("decode_attention", True):
        results["decode_attention"] = decode_attention_routes(pipe, spec, new)

    if args.json:  # keep what is measured so far, should a later phase fail
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    # ---- int8 ----
    del ref
    q = phimm.load(ckpt, dtype=args.dtype, threads=args.threads, quantize="int8")
    q_bytes = decode_weight_bytes(q.model)
    q_dec = max(q("<|user|>hello<|end|><|assistant|>", max_new_tokens=2 * new, min_new_tokens=2 * new).tokens_per_s
                for _ in range(2))
    agreement, logit_diff, where = int8_agreement(args, q if not _embedded_available() else None, pipe)
    results["int8"] = {"decode_speedup": q_dec / dec, "bytes_ratio": q_bytes / weight_bytes, "agreement": agreement,
                       "max_logit_diff": logit_diff, "agreement_on": where, "decode_tok_s": q_dec,
                       "decode_bandwidth_fraction": q_bytes * q_dec / (bandwidth * 1e9),
                       "routes": route_decode(q, first, new, q_bytes, bandwidth)}
    del q
    # ---- int4 ----
    from .quant import INT4_GROUP_SIZE

    q4 = phimm.load(ckpt, dtype=args.dtype, threads=args.threads, quantize="int4")
    q4_bytes = decode_weight_bytes(q4.model)
    q4_dec = max(q4("<|user|>hello<|end|><|assistant|>", max_new_tokens=2 * new, min_new_tokens=2 * new).tokens_per_s
                 for _ in range(2))
    agreement, logit_diff, where = int8_agreement(args, q4 if not _embedded_available() else None, pipe, kind="int4")
    from .kernels import int4_kernel

    native = int4_kernel()
    isa = "AVX-512 VNNI" + (", AMX from 16 rows" if native is not None and native.amx else "")
    kernel = {"phimm": f"phimm.kernels int4_gemm ({isa}, int8-quantized input)",
              "aten": "aten._weight_int4pack_mm_for_cpu"}.get(q4.model.hf.lm_head.base_format.kernel,
                                                               "dequantize + matmul (fallback)")
    results["int4"] = {"decode_speedup": q4_dec / dec, "vs_int8": q4_dec / q_dec,
                       "bytes_ratio": q4_bytes / weight_bytes, "agreement": agreement, "max_logit_diff": logit_diff,
                       "agreement_on": where, "decode_tok_s": q4_dec, "group_size": INT4_GROUP_SIZE,
                       "kernel": kernel, "decode_bandwidth_fraction": q4_bytes * q4_dec / (bandwidth * 1e9)}
    del q4
    results["memory"]["peak_rss_mb"] = peak_rss_mb()
    return results


def decode_weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: the decoder's projections, norms and the output head."""
    def nbytes(t):
        return t.numel() * t.element_size()

    total = 0
    for mod in list(model.hf.model.layers.modules()) + [model.hf.model.norm, model.hf.lm_head]:
        if hasattr(mod, "base_nbytes"):  # LoraLinear / FormatLinear: the base weight in its format
            total += mod.base_nbytes
        elif isinstance(mod, torch.nn.Linear) or hasattr(mod, "variance_epsilon"):
            total += sum(nbytes(p) for p in mod.parameters(recurse=False))
    return total


def _embedded_available() -> bool:
    from .pipeline import EMBEDDED_DIR

    return (EMBEDDED_DIR / "config.json").is_file()


def int8_agreement(args, q_pipe, bf16_pipe, n_prompts: int = 24, steps: int = 8, kind: str = "int8"):
    """Greedy next-token agreement of a quantized pipeline (`kind`: int8 or int4) with bf16, teacher-forced on
    bf16's own continuation, on the embedded model's held-out prompts when it is shipped (else on the bench
    model's prompts)."""
    import phimm

    if q_pipe is None:
        bf16_pipe = phimm.load(None, dtype=args.dtype, threads=args.threads)
        q_pipe = phimm.load(None, dtype=args.dtype, threads=args.threads, quantize=kind)
        reqs = _heldout_requests(n_prompts)
        where = "embedded model, held-out toy-domain requests"
    else:
        reqs = [to_request(r) for r in workload(SIZES[args.size], seed=1)]
        where = "bench model, workload requests"
    agree = total = 0
    worst = 0.0
    for req in reqs:
        a = bf16_pipe(req, max_new_tokens=steps, output_logits=True)
        b = q_pipe(req, max_new_tokens=steps, output_logits=True)
        # compare step by step while the two continuations are identical (teacher forcing without a re-run)
        for la, lb in zip(a.logits, b.logits):
            total += 1
            agree += int(la.argmax() == lb.argmax())
            worst = max(worst, (la.float() - lb.float()).abs().max().item())
            if la.argmax() != lb.argmax():
                break
    return agree / max(total, 1), worst, where


def _heldout_requests(n: int):
    import phimm
    from .toy.data import make_split

    reqs = []
    for kind in ("vqa", "asr", "text"):
        for s in make_split(kind, n // 3, seed=4242, heldout=True):
            reqs.append(_toy_request(phimm, kind, s))
    return reqs


def _toy_request(phimm, kind, s):
    if kind == "text":
        return phimm.Request(messages=[{"role": "user", "content": s["prompt"]}])
    parts = []
    if "image" in s:
        parts.append({"type": "image", "image": s["image"]})
    if "audio" in s:
        parts.append({"type": "audio", "audio": (s["audio"], s["sample_rate"])})
    text = s.get("question") if kind == "vqa" else "Transcribe the audio clip into text."
    parts.append({"type": "text", "text": text})
    return phimm.Request(messages=[{"role": "user", "content": parts}])


def markdown(results: dict, command: str) -> str:
    m, s = results.get("mixed"), results["single"]
    c = results["config"]
    mem = results["memory"]
    bw = results.get("bandwidth") or {"best": results["bandwidth_gbs"]}
    lines = [
        f"Command: `{command}`",
        "",
        f"Model: {c['parameters'] / 1e6:.0f}M parameters (random weights, size {c['size']}), {c['dtype']}, "
        f"{c['threads']} thread(s), {c['new_tokens']} new tokens, LoRA r={c['lora_rank']}, image {c['image'][0]}x"
        f"{c['image'][1]}, audio {c['audio_s']} s, torch {c['torch']}. Bandwidth: "
        + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items() if k != "best") + f" (best {bw['best']:.1f}).",
        "",
        "| workload | phimm | transformers + peft | ratio |",
        "|---|---|---|---|",
    ]
    if m:
        median = f", median of {len(m['speedup_each'])} runs {m['speedup_median']:.2f}x" if "speedup_each" in m else ""
        lines += [
            f"| 16 mixed requests, wall time | {m['phimm_s']:.2f} s | {m['reference_best_s']:.2f} s (best of "
            f"one-at-a-time {m['reference_one_at_a_time_s']:.2f} s / per-modality batches "
            f"{m['reference_per_modality_s']:.2f} s) | {m['speedup']:.2f}x faster{median} |",
            f"| 16 mixed requests, requests/s | {m['phimm_requests_per_s']:.2f} | {16 / m['reference_best_s']:.2f} | |",
            f"| 16 mixed requests, tokens/s | {m['phimm_tokens_per_s']:.1f} | {m['reference_tokens_per_s']:.1f} | |",
            f"| every batch row equals the request alone (fp32) | {m['rows_matching']} rows, max first-step logit "
            f"diff {m['max_first_logit_diff_fp32']:.1e} | | |",
        ]
    for kind, v in s.items():
        lines.append(f"| {kind}: time to first token | {v['phimm_ttft_s']:.3f} s | {v['reference_ttft_s']:.3f} s | "
                     f"{v['ttft_ratio']:.2f} (phimm / ref) |")
        extra = (f" ({100 * v['bandwidth_fraction']:.0f} % of the bandwidth, {v['bytes_per_token'] / 1e6:.0f} MB/token; "
                 f"{v['decode_over_text']:.2f}x text)" if "bandwidth_fraction" in v else "")
        lines.append(f"| {kind}: decode tokens/s | {v['phimm_decode_tok_s']:.1f}{extra} | "
                     f"{v['reference_decode_tok_s']:.1f} | {v['decode_ratio']:.2f} (phimm time / ref time) |")
    q = results["int8"]
    lines += [
        f"| batch-1 text decode | {results['decode_tok_s']:.1f} tok/s = {100 * results['decode_bandwidth_fraction']:.0f} % "
        f"of {results['bandwidth_gbs']:.1f} GB/s ({results['decode_weight_bytes'] / 1e6:.0f} MB/token) | | |",
        f"| int8 batch-1 decode | {q['decode_tok_s']:.1f} tok/s ({q['decode_speedup']:.2f}x bf16"
        + (f", {100 * q['decode_bandwidth_fraction']:.0f} % of the bandwidth" if "decode_bandwidth_fraction" in q else "")
        + f"), weights {q['bytes_ratio']:.2f}x, next-token agreement {100 * q['agreement']:.1f} % "
        f"({q['agreement_on']}) | | |",
    ]
    if q.get("routes"):
        lines.append("| int8 decode per route | " + ", ".join(
            f"{k} {v['decode_tok_s']:.1f} tok/s ({100 * v['bandwidth_fraction']:.0f} %, {v['over_text']:.2f}x text)"
            for k, v in q["routes"].items()) + " | | |")
    q4 = results.get("int4")
    if q4:
        lines.append(
            f"| int4 batch-1 decode (groups of {q4['group_size']}, {q4['kernel']}) | {q4['decode_tok_s']:.1f} tok/s "
            f"({q4['decode_speedup']:.2f}x bf16, {q4['vs_int8']:.2f}x int8), weights {q4['bytes_ratio']:.2f}x, "
            f"next-token agreement {100 * q4['agreement']:.1f} % ({q4['agreement_on']}) | | |")
    over = (f" = {mem['phimm_over_checkpoint']:.2f}x the checkpoint's {mem['checkpoint_mb']:.0f} MB in {c['dtype']}"
            if "checkpoint_mb" in mem else "")
    lines += [
        f"| memory (RSS after loading and one request of each route) | {mem['phimm_weights_rss_mb']:.0f} MB{over} | "
        f"{mem['reference_weights_rss_mb']:.0f} MB | peak RSS of the run {mem['peak_rss_mb']:.0f} MB |",
    ]
    if "phimm_weights_held_mb" in mem:
        lines.append(
            f"| weights held then (tensor by tensor: own copies + checkpoint pages read) | "
            f"{mem['phimm_weights_held_mb']:.0f} MB = {mem['phimm_held_over_checkpoint']:.2f}x the checkpoint | "
            f"{mem['reference_weights_held_mb']:.0f} MB = {mem['reference_held_over_checkpoint']:.2f}x | |")
    d = results.get("decode_attention")
    if d:
        for impl, label in (("phimm", "phimm attention"), ("sdpa", "sdpa attention")):
            v = d[impl]
            lines.append(f"| decode, {label}: text / text on the vision adapter / image ({d['positions']['image']} "
                         f"positions) tok/s | {v['text_tok_s']:.1f} / {v['text_vision_tok_s']:.1f} / "
                         f"{v['image_tok_s']:.1f} | | image / text {v['image_over_text']:.2f}, image / text on the "
                         f"vision adapter {v['image_over_text_vision']:.2f} |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="209m", choices=sorted(SIZES))
    p.add_argument("--quick", action="store_true", help="the smallest size (CI smoke run)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--workdir", default="runs", help="where the random checkpoints are written (reused)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the Markdown table here")
    p.add_argument("--decode-attention", action="store_true",
                   help="only text vs image decode tok/s with phimm's decode attention and with sdpa")


def cmd_bench(args) -> int:
    if args.quick:
        args.size = "quick"
    command = "phimm bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "phimm bench"
    if args.decode_attention:
        results = run_decode_attention(args)
        c = results["config"]
        table = decode_attention_markdown(
            results["decode_attention"], command,
            f"Model: {c['parameters'] / 1e6:.0f}M parameters (random weights, size {c['size']}), {c['dtype']}, "
            f"{c['threads']} thread(s), {results['decode_attention']['new_tokens']} new tokens, best of "
            f"{results['decode_attention']['repeats']}, peak RSS {results['memory']['peak_rss_mb']:.0f} MB, "
            f"torch {c['torch']}.")
    else:
        results = run(args)
        table = markdown(results, command)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


def register(sub) -> argparse.ArgumentParser:
    """Add `phimm bench`; returns its parser (the command line adds `phimm bench serve` under it)."""
    p = sub.add_parser("bench", help="phimm vs transformers + peft on the same random weights "
                                     "(`phimm bench serve`: continuous batching over HTTP)")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phimm.bench")
    add_arguments(p)
    return cmd_bench(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
