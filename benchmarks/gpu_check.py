"""One prepared check of phimm on a GPU (or, `--device cpu --size quick`, the same code on the CPU for CI).

Everything is built from code on the machine it runs on: nothing is downloaded and no checkpoint travels.

1. **Environment**: versions, the device, its measured memory bandwidth (best of a device-to-device copy, bytes
   read + written, and a sum, bytes read).
2. **Parity**: a tiny random Phi-4-multimodal in float32 on the device, phimm against transformers + peft on the
   same weights, on the four routes (text, image, audio, image + audio), each alone and all four in one batch:
   greedy tokens equal, first-step logits within 1e-4.
3. **Full size**: a random-weight model of the published size (`--size full`: 32 decoder layers of 3072, SigLIP
   1152 x 27, conformer 1024 x 24, LoRA r=256 vision / r=320 speech; `--size quick`: a miniature) in bfloat16,
   built directly on the device with a fixed seed. phimm runs first, alone on the device; then the model is
   freed and transformers + peft is built on the same weights (same seed) and runs the same requests.
   - batch-1 decode tokens/s per route, and the fraction of the measured bandwidth the text route reaches
     (weights read per step / time per step; adapter bytes counted on adapter routes);
   - TTFT per route, phimm and reference;
   - `4 x per_route` mixed requests (64 at full size) through phimm's engine against the reference's best
     grouping (one generate call per modality);
   - peak device memory against the weights plus the KV cache the engine reports.

Writes `gpu_check.json` to `--out` after every phase (a run cut short keeps what it measured) and prints a table.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT              # on the GPU
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --size quick --out /tmp/gc   # CI
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from phimm.bench import ADAPTER, Reference as BenchReference  # noqa: E402

ROUTES = ("text", "image", "audio", "image+audio")
IMG, AUD = "<|endoftext10|>", "<|endoftext11|>"
PROMPTS = {
    "text": "<|user|>what color is the circle number {i}<|end|><|assistant|>",
    "image": "<|user|>" + IMG + "what shape is the red one<|end|><|assistant|>",
    "audio": "<|user|>" + AUD + "Transcribe the audio clip into text.<|end|><|assistant|>",
    "image+audio": "<|user|>" + IMG + AUD + "Answer the spoken question about the image.<|end|><|assistant|>",
}

SIZES = {
    # CI on the CPU: a miniature of the published layout, seconds
    "quick": dict(full=dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vision_hidden=32,
                            vision_layers=1, audio_hidden=32, audio_blocks=1, lora_ranks={"vision": 8, "speech": 12}),
                  per_route=2, new=6, image=(320, 240), audio_s=1.0, bandwidth_mb=64, parity_new=6),
    # the published widths and depths
    "full": dict(full=None, per_route=16, new=32, image=(640, 480), audio_s=4.0, bandwidth_mb=2048, parity_new=8),
}


# ---- helpers -----------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def versions() -> dict:
    import peft
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
    return out


def measure_bandwidth(device: torch.device, mb: int, repeats: int = 10) -> dict:
    """GB/s of a device-to-device copy (bytes read + written) and of a sum (bytes read), best of `repeats`."""
    n = mb * 2**20 // 4
    x = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    res = {}
    for name, fn, nbytes in (("copy", lambda: y.copy_(x), 2 * x.numel() * 4), ("sum", lambda: x.sum(), x.numel() * 4)):
        fn()
        best = float("inf")
        for _ in range(repeats):
            t = clock(device)
            fn()
            best = min(best, clock(device) - t)
        res[f"{name}_gbs"] = nbytes / best / 1e9
    res["best_gbs"] = max(res["copy_gbs"], res["sum_gbs"])
    return res


def requests(per_route: int, image_size, audio_s: float, seed: int = 0):
    """`per_route` requests of every route, every image and clip its own (no feature cache can help)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = image_size
    out = []
    for i in range(per_route):
        for route in ROUTES:
            images, audios = [], []
            if "image" in route:
                images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
            if "audio" in route:
                t = np.arange(int(audio_s * 16000)) / 16000
                wave = 0.3 * np.sin(2 * np.pi * (180 + 20 * i + rng.integers(0, 50)) * t)
                audios.append(((wave + 0.02 * rng.standard_normal(t.shape)).astype(np.float32), 16000))
            out.append((route, PROMPTS[route].format(i=i), images, audios))
    return out


def to_request(r):
    import phimm

    return phimm.Request(prompt=r[1], images=r[2], audios=r[3])


class Reference(BenchReference):
    """transformers' `Phi4MultimodalForCausalLM` + peft, the adapter switched by hand per call, as its users do
    (`phimm.bench.Reference` on a device, with the first-step logits and greedy tokens the parity check reads)."""

    def __init__(self, model, processor, device):
        super().__init__(None, model=model, processor=processor, device=device)

    @torch.inference_mode()
    def first_logits(self, r) -> torch.Tensor:
        with self._ctx(ADAPTER[r[0]]):
            return self.model(**self.inputs([r])).logits[0, -1].float().cpu()

    def generate(self, batch, new: int) -> torch.Tensor:
        return self.run(batch, new).cpu()


# ---- phases ------------------------------------------------------------------------------------------------------


def parity(device: torch.device, root: Path, size: dict) -> dict:
    """Tiny random model, float32: phimm alone and mixed against transformers + peft alone."""
    import phimm
    from phimm.bench import reference_model
    from phimm.testing import make_tiny_checkpoint
    from transformers import Phi4MultimodalProcessor

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    new = size["parity_new"]
    ckpt = make_tiny_checkpoint(root / "parity", seed=0)
    pipe = phimm.load(ckpt, device=str(device), dtype="float32")
    ref = Reference(reference_model(ckpt, torch.float32).to(device), Phi4MultimodalProcessor.from_pretrained(str(ckpt)),
                    device)
    reqs = requests(1, (500, 300), 1.3, seed=1)
    gen = dict(max_new_tokens=new, min_new_tokens=new, output_logits=True)
    alone = {r[0]: pipe(to_request(r), **gen) for r in reqs}
    mixed = pipe([to_request(r) for r in reqs], **gen)
    res: dict = {"new_tokens": new, "routes": {}}
    ok = True
    for r, m in zip(reqs, mixed):
        want_tokens = ref.generate([r], new)[0].tolist()
        want_logits = ref.first_logits(r)
        row = {"adapter": alone[r[0]].route.adapter}
        for name, out in (("alone", alone[r[0]]), ("mixed", m)):
            if out.error is not None:
                row[name] = {"error": repr(out.error)}
                ok = False
                continue
            diff = (out.logits[0].float().cpu() - want_logits).abs().max().item()
            equal = out.token_ids == want_tokens
            row[name] = {"tokens_equal": equal, "max_first_logit_diff": diff}
            ok &= equal and diff <= 1e-4
        row["adapter_ok"] = row["adapter"] == ADAPTER[r[0]]
        ok &= row["adapter_ok"]
        res["routes"][r[0]] = row
        print(f"[parity] {r[0]}: {row}", flush=True)
    res["ok"] = bool(ok)
    pipe.close()
    del pipe, ref
    free(device)
    return res


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def full_config(size: dict):
    from phimm.formats.original_keys import native_config
    from phimm.formats.random_ckpt import full_original_config, shrink

    original = full_original_config()
    if size["full"] is not None:
        original, _ = shrink(original, **size["full"])
    return original, native_config(original, torch.bfloat16)


def build_base(native, device: torch.device, dtype: torch.dtype, seed: int):
    """`Phi4MultimodalForCausalLM(native)` with its parameters made on `device` and drawn from a generator seeded
    with `seed` (the same seed gives the same weights, on the same device): matrices N(0, 0.02), norms 1, biases
    0. Buffers (rotary frequencies and the like) are computed as transformers computes them."""
    from phimm.formats.empty import build_empty

    model = build_empty(native, dtype)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n].to(device))
        if native.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return model.eval().requires_grad_(False)


def make_adapters(model, original: dict, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """The config's LoRAs (r and alpha as published) with random A and B (B non-zero), on the decoder's linears."""
    from adapters import LoraAdapter, find_targets
    from phimm.formats.original_keys import lora_specs
    from phimm.model import PHI4MM_LORA_TARGETS

    targets = find_targets(model, PHI4MM_LORA_TARGETS)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    out = {}
    for name, spec in sorted(lora_specs(original).items()):
        weights = {}
        for path, lin in sorted(targets.items()):
            a = torch.randn(spec.r, lin.in_features, device=device, generator=g) / lin.in_features ** 0.5
            b = torch.randn(lin.out_features, spec.r, device=device, generator=g) * (0.02 / spec.r ** 0.5)
            weights[path] = (a.to(dtype), b.to(dtype))
        out[name] = LoraAdapter(name, spec.r, spec.alpha, weights, 0.0, PHI4MM_LORA_TARGETS)
    return out


def support_files(original: dict, folder: Path) -> Path:
    """config, tokenizer (a stand-in with the published special-token ids) and processor files: no weights."""
    from phimm.formats.random_ckpt import _write_common

    folder.mkdir(parents=True, exist_ok=True)
    _write_common(folder, "hf", original, torch.bfloat16, None)
    return folder


def adapter_bytes(adapters: dict) -> dict:
    return {n: sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in ad.weights.values())
            for n, ad in adapters.items()}


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def full_size_phimm(device, size, original, native, files: Path, seed: int, bandwidth: float) -> dict:
    from phimm.bench import decode_weight_bytes
    from phimm.engine import EngineLimits
    from phimm.model import Phi4MMComposition
    from phimm.pipeline import Pipeline
    from phimm.processor import Processor

    dtype = torch.bfloat16
    t = clock(device)
    hf = build_base(native, device, dtype, seed)
    adapters = make_adapters(hf, original, device, dtype, seed)
    model = Phi4MMComposition(hf, adapters)
    processor = Processor.from_pretrained(files, native)
    n = 4 * size["per_route"]
    limits = EngineLimits(max_running=n, max_waiting=4 * n, kv_budget_tokens=n * 4096, max_prefill_tokens=16384)
    pipe = Pipeline(model, processor, name="gpu-check", limits=limits)
    build_s = clock(device) - t
    params = sum(p.numel() for p in hf.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    a_bytes = adapter_bytes(adapters)
    res: dict = {"build_s": build_s, "parameters": params, "weights_gib": weight_bytes / 2**30,
                 "adapter_gib": {k: v / 2**30 for k, v in a_bytes.items()}, "weight_format": model.weight_format}
    print(f"[full] phimm built in {build_s:.1f}s: {params / 1e9:.2f}B parameters, "
          f"{weight_bytes / 2**30:.1f} GiB + adapters {sum(a_bytes.values()) / 2**30:.2f} GiB", flush=True)
    new = size["new"]
    reqs = requests(size["per_route"], size["image"], size["audio_s"], seed=seed)
    one = {route: next(r for r in reqs if r[0] == route) for route in ROUTES}

    # warm-up: every route once (kernel selection, allocator)
    pipe([to_request(r) for r in one.values()], max_new_tokens=4, min_new_tokens=4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # batch 1: TTFT and decode per route
    step_bytes = decode_weight_bytes(model)
    single = {}
    for route, r in one.items():
        outs = [pipe(to_request(r), max_new_tokens=2 * new, min_new_tokens=2 * new) for _ in range(2)]
        dec = max(o.tokens_per_s for o in outs)
        extra = a_bytes.get(ADAPTER[route] or "", 0)
        single[route] = {"ttft_s": min(o.ttft_s for o in outs), "decode_tok_s": dec,
                         "prompt_tokens": outs[0].prompt_tokens,
                         "bandwidth_fraction": (step_bytes + extra) * dec / (bandwidth * 1e9)}
        print(f"[full] phimm {route}: {single[route]}", flush=True)
    text_dec = single["text"]["decode_tok_s"]
    for route in ROUTES:
        single[route]["decode_vs_text"] = single[route]["decode_tok_s"] / text_dec
    res["single"] = single
    res["decode_weight_gib"] = step_bytes / 2**30

    # the same decode steps without CUDA graphs (eager launches), for the record
    if device.type == "cuda":
        os.environ["PHIMM_CUDA_GRAPHS"] = "0"
        try:
            eager = Pipeline(model, processor, name="gpu-check-eager", limits=limits)
            res["single_eager"] = {}
            for route in ("text", "image"):
                outs = [eager(to_request(one[route]), max_new_tokens=2 * new, min_new_tokens=2 * new)
                        for _ in range(2)]
                res["single_eager"][route] = {"decode_tok_s": max(o.tokens_per_s for o in outs)}
            eager.close()
        finally:
            os.environ.pop("PHIMM_CUDA_GRAPHS", None)
        print(f"[full] phimm eager (no graphs): {res['single_eager']}", flush=True)

    # one decode step's device time alone: the batch-1 base-model graph replayed back to back
    g = pipe.engine._graphs
    if g is not None and g.capture:
        base1 = [v for k, v in g.graphs.items() if k[0] == 1 and k[2] == ("base",)]
        if base1:
            graph = base1[0][0]
            with torch.inference_mode():
                g.ints.zero_()  # column 0, no cached positions: in range for any graph (no row is running now)
                graph.replay()
                t = clock(device)
                for _ in range(50):
                    graph.replay()
                step = (clock(device) - t) / 50
            res["graph_replay_ms_batch1_text"] = step * 1e3
            res["graph_replay_bandwidth_fraction"] = step_bytes / step / (bandwidth * 1e9)
            print(f"[full] one batch-1 text step replayed alone: {step * 1e3:.2f} ms "
                  f"({res['graph_replay_bandwidth_fraction']:.1%} of the bandwidth)", flush=True)

    # the host's share of the mixed workload: preparing (tokenizing, image and audio processing) every request
    t = time.perf_counter()
    for r in reqs:
        pipe.prepare(to_request(r))
    res["prepare_all_s"] = time.perf_counter() - t

    # mixed: every request submitted at once, the engine batches them continuously
    best, outs = float("inf"), None
    for _ in range(2):
        t = clock(device)
        outs = pipe([to_request(r) for r in reqs], max_new_tokens=new, min_new_tokens=new)
        best = min(best, clock(device) - t)
    errors = [repr(o.error) for o in outs if o.error is not None]
    res["mixed"] = {"requests": len(reqs), "new_tokens": new, "seconds": best, "requests_per_s": len(reqs) / best,
                    "tokens_per_s": len(reqs) * new / best, "errors": errors[:3],
                    "routes": sorted({str(o.route) for o in outs if o.route is not None})}
    print(f"[full] phimm mixed {len(reqs)} requests: {best:.2f}s (preparing them: {res['prepare_all_s']:.2f}s)",
          flush=True)
    # once more, the engine timing each phase of its steps (synchronising the device at each phase's ends)
    engine = pipe.engine
    engine.profile, before = True, dict(engine.phase_s)
    t = clock(device)
    pipe([to_request(r) for r in reqs], max_new_tokens=new, min_new_tokens=new)
    res["mixed"]["profiled_s"] = clock(device) - t
    engine.profile = False
    res["mixed"]["phases_s"] = {k: round(v - before.get(k, 0.0), 4) for k, v in engine.phase_s.items()}
    print(f"[full] phimm mixed, phases: {res['mixed']['phases_s']}", flush=True)
    stats = pipe.stats()
    res["engine_stats"] = {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}
    kv = stats.get("kv_bytes_peak", 0)
    res["kv_cache_peak_gib"] = kv / 2**30
    if device.type == "cuda":
        res["peak_gib"] = peak_gib(device)
        res["allocated_after_gib"] = torch.cuda.memory_allocated(device) / 2**30
        res["peak_vs_weights_plus_kv"] = res["peak_gib"] * 2**30 / (weight_bytes + sum(a_bytes.values()) + kv)
    res["first_logits_text"] = pipe(to_request(one["text"]), max_new_tokens=1, output_logits=True).logits[0].float().cpu()
    pipe.close()
    del pipe, model, hf, adapters
    free(device)
    return res


def full_size_reference(device, size, original, native, files: Path, seed: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import Phi4MultimodalProcessor

    from phimm.formats.original_keys import lora_specs
    from phimm.model import PHI4MM_LORA_TARGETS, make_vision_attention_bidirectional

    dtype = torch.bfloat16
    t = clock(device)
    base = build_base(native, device, dtype, seed)
    make_vision_attention_bidirectional(base)
    adapters = make_adapters(base, original, device, dtype, seed)  # the same draws as phimm's
    model = None
    for name, spec in sorted(lora_specs(original).items()):
        cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=PHI4MM_LORA_TARGETS, lora_dropout=0.0,
                         init_lora_weights=False, task_type="CAUSAL_LM")
        if model is None:
            try:
                model = get_peft_model(base, cfg, adapter_name=name, autocast_adapter_dtype=False)
            except TypeError:  # older peft
                model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    inner = model.base_model.model
    with torch.no_grad():
        for name, ad in adapters.items():
            for path, (a, b) in ad.weights.items():
                mod = inner.get_submodule(path)
                mod.lora_A[name].weight.copy_(a)
                mod.lora_B[name].weight.copy_(b)
    del adapters
    model.eval()
    ref = Reference(model, Phi4MultimodalProcessor.from_pretrained(str(files)), device)
    build_s = clock(device) - t
    new = size["new"]
    reqs = requests(size["per_route"], size["image"], size["audio_s"], seed=seed)
    one = {route: next(r for r in reqs if r[0] == route) for route in ROUTES}
    for r in one.values():  # warm-up
        ref.generate([r], 2)
    res: dict = {"build_s": build_s, "single": {}}
    for route, r in one.items():
        t1s, tns = [], []
        for _ in range(2):
            t = clock(device)
            ref.generate([r], 1)
            t1s.append(clock(device) - t)
            t = clock(device)
            ref.generate([r], 2 * new)
            tns.append(clock(device) - t)
        t1, tn = min(t1s), min(tns)
        res["single"][route] = {"ttft_s": t1, "decode_tok_s": (2 * new - 1) / max(tn - t1, 1e-9)}
        print(f"[full] reference {route}: {res['single'][route]}", flush=True)
    best = float("inf")
    for _ in range(2):
        t = clock(device)
        for route in ROUTES:
            ref.generate([r for r in reqs if r[0] == route], new)
        best = min(best, clock(device) - t)
    res["mixed"] = {"requests": len(reqs), "grouping": "one generate call per modality", "seconds": best,
                    "requests_per_s": len(reqs) / best, "tokens_per_s": len(reqs) * new / best}
    print(f"[full] reference mixed {len(reqs)} requests, grouped per modality: {best:.2f}s", flush=True)
    res["first_logits_text"] = ref.first_logits(one["text"])
    del ref, model, base
    free(device)
    return res


def summarize(results: dict) -> dict:
    full = results.get("full") or {}
    p, r = full.get("phimm") or {}, full.get("reference") or {}
    s: dict = {}
    if p.get("single"):
        s["text_decode_bandwidth_fraction"] = p["single"]["text"]["bandwidth_fraction"]
        s["decode_vs_text"] = {k: v["decode_vs_text"] for k, v in p["single"].items()}
    if p.get("peak_vs_weights_plus_kv"):
        s["peak_vs_weights_plus_kv"] = p["peak_vs_weights_plus_kv"]
    if p.get("single_eager"):
        s["graphs_vs_eager_text_decode"] = p["single"]["text"]["decode_tok_s"] / p["single_eager"]["text"]["decode_tok_s"]
    if p.get("single") and r.get("single"):
        s["ttft_ratio"] = {k: p["single"][k]["ttft_s"] / r["single"][k]["ttft_s"] for k in ROUTES}
        s["decode_speedup"] = {k: p["single"][k]["decode_tok_s"] / r["single"][k]["decode_tok_s"] for k in ROUTES}
    if p.get("mixed") and r.get("mixed"):
        s["mixed_speedup"] = r["mixed"]["seconds"] / p["mixed"]["seconds"]
    if "parity" in results:
        s["parity_ok"] = results["parity"].get("ok")
    return s


def table(results: dict) -> str:
    full = results.get("full") or {}
    p, r = full.get("phimm") or {}, full.get("reference") or {}
    lines = ["| route | phimm TTFT s | ref TTFT s | phimm decode tok/s | ref decode tok/s | vs text | bandwidth |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k in ROUTES:
        ps, rs = (p.get("single") or {}).get(k), (r.get("single") or {}).get(k)
        if not ps:
            continue
        lines.append(f"| {k} | {ps['ttft_s']:.3f} | {rs['ttft_s'] if rs else float('nan'):.3f} | "
                     f"{ps['decode_tok_s']:.1f} | {rs['decode_tok_s'] if rs else float('nan'):.1f} | "
                     f"{ps['decode_vs_text']:.2f} | {ps['bandwidth_fraction']:.1%} |")
    s = results.get("summary", {})
    if "mixed_speedup" in s:
        lines.append(f"\nmixed {p['mixed']['requests']} requests: phimm {p['mixed']['seconds']:.2f} s, reference "
                     f"(per modality) {r['mixed']['seconds']:.2f} s: {s['mixed_speedup']:.2f}x")
    if "parity_ok" in s:
        lines.append(f"parity (fp32, four routes, alone and mixed): {'ok' if s['parity_ok'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="full (default on cuda) or quick")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: parity, reference")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size_name = args.size or ("full" if device.type == "cuda" else "quick")
    size = SIZES[size_name]
    skip = {s for s in args.skip.split(",") if s}
    if device.type == "cpu":
        torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "device": str(device),
                     "size": size_name, "versions": versions(), "errors": {}}

    def save():
        results["summary"] = summarize(results)
        results["elapsed_s"] = time.perf_counter() - t_start
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=_json) + "\n")

    def phase(name, fn):
        t = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # keep what the other phases measure
            traceback.print_exc()
            results["errors"][name] = f"{type(e).__name__}: {e}"
            free(device)
            return None
        finally:
            print(f"[gpu_check] {name}: {time.perf_counter() - t:.1f}s", flush=True)
            save()

    print(f"[gpu_check] {results['versions']}", flush=True)
    results["bandwidth"] = phase("bandwidth", lambda: measure_bandwidth(device, size["bandwidth_mb"]))
    with tempfile.TemporaryDirectory() as tmp:
        if "parity" not in skip:
            results["parity"] = phase("parity", lambda: parity(device, Path(tmp), size))
        original, native = full_config(size)
        files = support_files(original, Path(tmp) / "support")
        bw = (results["bandwidth"] or {}).get("best_gbs", float("nan"))
        results["full"] = {}
        results["full"]["phimm"] = phase("full_phimm", lambda: full_size_phimm(device, size, original, native, files,
                                                                              args.seed, bw))
        if "reference" not in skip:
            results["full"]["reference"] = phase("full_reference", lambda: full_size_reference(
                device, size, original, native, files, args.seed))
        p, r = results["full"].get("phimm"), results["full"].get("reference")
        if p and r:
            a, b = p.pop("first_logits_text"), r.pop("first_logits_text")
            results["full"]["first_logits_text_max_diff_bf16"] = (a - b).abs().max().item()
        for x in (p, r):
            if x:
                x.pop("first_logits_text", None)
    save()
    print(table(results), flush=True)
    print(json.dumps(results["summary"], indent=1, default=_json), flush=True)
    return 1 if results["errors"] else 0


def _json(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
