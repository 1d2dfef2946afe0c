"""Full-size load benchmark: phimm on the ORIGINAL layout against transformers + peft on the native layout.

Writes a random-weight bf16 checkpoint of the published size (2047 tensors, 11.1 GB) in the original layout (with
the `vision-lora/` / `speech-lora/` folders the published repo also has), and the same weights (same seed) in
transformers' native layout; then, one subprocess at a time and with the files evicted from the page cache before
each (cold start), loads each and generates a few tokens on every route (text, image, audio, image+audio), and
prints load time, peak RSS (`ru_maxrss` of the subprocess) and decode tokens/s, plus how far phimm's first-step
logits are from transformers'.

    python benchmarks/load_full_size.py                       # writes under runs/full_size, deletes it at the end
    python benchmarks/load_full_size.py --keep --root /tmp/x  # keep the 25 GB of files for another run (--reuse)

Targets: phimm's peak RSS < 1.25 x the checkpoint's bytes; phimm's load time no worse than transformers'.
Not a unit test: it takes minutes and ~25 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFERENCE = Path(os.environ.get("PHIMM_REFERENCE", "/work/shared/phi4mm-reference"))
ROUTES = ("text", "image", "audio", "image+audio")
PROMPTS = {  # original-style placeholders for phimm; raw placeholder tokens for transformers' processor
    "text": "<|user|>Describe the weather in one sentence.<|end|><|assistant|>",
    "image": "<|user|><|image_1|>What is shown in this image?<|end|><|assistant|>",
    "audio": "<|user|><|audio_1|>Transcribe the audio clip into text.<|end|><|assistant|>",
    "image+audio": "<|user|><|image_1|><|audio_1|>Answer the spoken question about the image.<|end|><|assistant|>",
}


def media(route: str, image_size: int, audio_seconds: float):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images, audios = [], []
    if "image" in route:
        images.append(Image.fromarray(rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)))
    if "audio" in route:
        rate = 16000
        t = np.arange(int(audio_seconds * rate)) / rate
        wave = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
        audios.append((wave, rate))
    return images, audios


def rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


# ---- children ----------------------------------------------------------------------------------------------------


def child_phimm(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    import accelerate  # noqa: F401  (imports are timed apart from the load, for both systems)
    import phimm
    from transformers import (AutoTokenizer, Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM,  # noqa: F401
                              Phi4MultimodalImageProcessor)

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe = phimm.load(args.dir, dtype="bfloat16", threads=args.threads)
    load_s = time.perf_counter() - t0
    if args.skip_unused_vision_head:
        skip_vision_head(pipe.model.hf)
    out = {"system": "phimm (original layout)", "import_s": import_s, "load_s": load_s,
           "rss_after_load_gb": rss_gb(), "routes": {}}
    logits = {}
    for route in ROUTES:
        images, audios = media(route, args.image_size, args.audio_seconds)
        t = time.perf_counter()
        o = pipe(phimm.Request(prompt=PROMPTS[route], images=images, audios=audios), max_new_tokens=args.tokens,
                 min_new_tokens=args.tokens, output_logits=True)
        out["routes"][route] = {"adapter": o.route.adapter, "prompt_tokens": o.prompt_tokens, "tokens": o.token_ids,
                                "ttft_s": o.ttft_s, "decode_tok_s": o.tokens_per_s,
                                "total_s": time.perf_counter() - t}
        logits[route] = o.logits[0].float()
        if route == ROUTES[0]:
            out["first_request_s"] = time.perf_counter() - t
    torch.save(logits, Path(args.result).with_suffix(".logits.pt"))
    out["peak_rss_gb"] = rss_gb()
    return out


def child_transformers(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from peft import PeftModel
    from transformers import LogitsProcessor, Phi4MultimodalForCausalLM, Phi4MultimodalProcessor

    import_s = time.perf_counter() - t0
    d = Path(args.dir)
    t0 = time.perf_counter()
    base = Phi4MultimodalForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16)
    # SigLIP is bidirectional; transformers' vision attention says causal (see phimm.model)
    from phimm.model import make_vision_attention_bidirectional

    make_vision_attention_bidirectional(base)
    if args.skip_unused_vision_head:
        skip_vision_head(base)
    model = PeftModel.from_pretrained(base, str(d / "vision-lora"), adapter_name="vision")
    model.load_adapter(str(d / "speech-lora"), adapter_name="speech")
    model.eval()
    processor = Phi4MultimodalProcessor.from_pretrained(str(d))
    load_s = time.perf_counter() - t0
    out = {"system": "transformers + peft (native layout)", "import_s": import_s, "load_s": load_s,
           "rss_after_load_gb": rss_gb(), "routes": {}}

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    import contextlib

    logits = {}
    adapters = {"text": None, "image": "vision", "audio": "speech", "image+audio": "vision"}
    for route in ROUTES:
        images, audios = media(route, args.image_size, args.audio_seconds)
        prompt = PROMPTS[route].replace("<|image_1|>", "<|endoftext10|>").replace("<|audio_1|>", "<|endoftext11|>")
        kw = {}
        if images:
            kw["images"] = images
        if audios:
            kw["audio"] = [a for a, _ in audios]
            kw["sampling_rate"] = audios[0][1]
        t = time.perf_counter()
        inputs = processor(text=prompt, return_tensors="pt", **kw)
        adapter = adapters[route]
        if adapter is None:
            ctx = model.disable_adapter()
        else:
            model.set_adapter(adapter)
            ctx = contextlib.nullcontext()
        clock = Clock()
        with ctx, torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                                 logits_processor=[clock], output_logits=True, return_dict_in_generate=True)
        n = inputs["input_ids"].shape[1]
        toks = gen.sequences[0, n:].tolist()
        decode = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]) if len(clock.times) > 1 else None
        out["routes"][route] = {"adapter": adapter, "prompt_tokens": n, "tokens": toks,
                                "ttft_s": clock.times[0] - t if clock.times else None, "decode_tok_s": decode,
                                "total_s": time.perf_counter() - t}
        logits[route] = gen.logits[0][0].float()
        if route == ROUTES[0]:
            out["first_request_s"] = time.perf_counter() - t
    torch.save(logits, Path(args.result).with_suffix(".logits.pt"))
    out["peak_rss_gb"] = rss_gb()
    return out


def skip_vision_head(hf_model) -> None:
    """`--skip-unused-vision-head`: SigLIP's attention-pooling head runs on every image although Phi-4-multimodal
    only uses hidden_states[-2]; in bf16 on CPU its nn.MultiheadAttention (batch_first, so F.linear gets a
    transposed input) allocates ~5 GB for a moment (torch 2.14). Skipping it changes no output."""
    hf_model.model.embed_tokens_extend.image_embed.img_processor.head.forward = (
        lambda hidden_state, attention_mask=None: None)


# ---- driver ------------------------------------------------------------------------------------------------------


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (cold start); needs no privileges for clean pages."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_child(kind: str, folder: Path, result: Path, args) -> dict:
    import psutil

    avail = psutil.virtual_memory().available / 1e9
    if avail < args.min_free_gb:
        raise SystemExit(f"only {avail:.1f} GB of memory available, {args.min_free_gb} needed: try again later")
    evict(folder)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PHIMM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, __file__, "--child", kind, "--dir", str(folder), "--result", str(result),
           "--tokens", str(args.tokens), "--threads", str(args.threads), "--image-size", str(args.image_size),
           "--audio-seconds", str(args.audio_seconds)] + (["--skip-unused-vision-head"] if args.skip_unused_vision_head
                                                            else [])
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    res = json.loads(result.read_text())
    res["wall_s"] = time.perf_counter() - t
    return res


def write_checkpoints(root: Path, args) -> tuple[Path, Path]:
    orig_dir, native_dir = root / "original", root / "native"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    shapes = REFERENCE / "tensor_shapes.DERIVED.json"
    extra = ["--shapes", str(shapes)] if shapes.is_file() else []
    for layout, d, more in (("original", orig_dir, ["--peft-folders"]), ("hf", native_dir, [])):
        if args.reuse and (d / "config.json").is_file():
            print(f"reusing {d}")
            continue
        if d.exists():
            shutil.rmtree(d)
        cmd = [sys.executable, "-m", "phimm.formats.random_ckpt", "--layout", layout, "--size", args.size, "--dtype",
               "bfloat16", "--seed", "0", "--out", str(d), *(extra if args.size == "full" else []), *more]
        print(f"$ {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, cwd=REPO)
        print(f"  {time.perf_counter() - t:.1f} s", flush=True)
    return orig_dir, native_dir


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in folder.glob(pattern) if f.is_file())


def report(orig_dir: Path, res: dict[str, dict], args) -> None:
    import torch

    ckpt = folder_bytes(orig_dir, "model-*.safetensors")
    head = ", unused vision head skipped" if args.skip_unused_vision_head else ""
    print("\n==== full-size load benchmark (bf16, CPU, "
          f"{args.threads} thread(s), {args.tokens} new tokens per route, image {args.image_size}x{args.image_size}, "
          f"audio {args.audio_seconds} s, cold page cache{head}) ====")
    print(f"checkpoint (original layout, main shards): {ckpt:,} bytes = {ckpt / 1e9:.3f} GB; "
          f"target peak RSS < 1.25 x = {1.25 * ckpt / 2**30:.2f} GiB")
    for key in ("phimm", "transformers"):
        r = res.get(key)
        if not r:
            continue
        ratio = r["peak_rss_gb"] * 2**30 / ckpt
        print(f"\n{r['system']}:")
        print(f"  load: {r['load_s']:.1f} s   load + first request (text): {r['load_s'] + r['first_request_s']:.1f} s"
              f"   (imports before: {r['import_s']:.1f} s; subprocess wall: {r['wall_s']:.1f} s)")
        print(f"  peak RSS: {r['peak_rss_gb']:.2f} GiB ({ratio:.3f} x checkpoint bytes); after load "
              f"{r['rss_after_load_gb']:.2f} GiB")
        for route, x in r["routes"].items():
            dec = f"{x['decode_tok_s']:.2f}" if x["decode_tok_s"] else "-"
            print(f"  {route:12s} adapter={str(x['adapter']):7s} prompt={x['prompt_tokens']:4d} tok  "
                  f"ttft={x['ttft_s']:.1f} s  decode={dec} tok/s  total={x['total_s']:.1f} s  tokens={x['tokens']}")
    if "phimm" in res and "transformers" in res:
        p, t = res["phimm"], res["transformers"]
        lp = torch.load(Path(args.root) / "phimm.logits.pt")
        lt = torch.load(Path(args.root) / "transformers.logits.pt")
        print("\nphimm vs transformers, first-step logits (bf16):")
        for route in ROUTES:
            d = (lp[route] - lt[route]).abs().max().item()
            same = p["routes"][route]["tokens"] == t["routes"][route]["tokens"]
            top = lp[route].argmax().item() == lt[route].argmax().item()
            print(f"  {route:12s} max|diff| {d:.4f} (logit scale {lt[route].abs().max().item():.2f}); "
                  f"same first token: {top}; same {args.tokens} tokens: {same}")
        ok_rss = p["peak_rss_gb"] * 2**30 < 1.25 * ckpt
        ok_load = p["load_s"] <= t["load_s"]
        print(f"\ntargets: peak RSS < 1.25 x checkpoint: {'MET' if ok_rss else 'NOT MET'}; "
              f"load time <= transformers': {'MET' if ok_load else 'NOT MET'} "
              f"({p['load_s']:.1f} s vs {t['load_s']:.1f} s; with the first request "
              f"{p['load_s'] + p['first_request_s']:.1f} s vs {t['load_s'] + t['first_request_s']:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=str(REPO / "runs" / "full_size"), help="where the checkpoints go")
    ap.add_argument("--tokens", type=int, default=4, help="new tokens per route")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--audio-seconds", type=float, default=0.5)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--reuse", action="store_true", help="reuse checkpoints left by --keep")
    ap.add_argument("--only", choices=["phimm", "transformers"], help="run one side only")
    ap.add_argument("--skip-unused-vision-head", action="store_true",
                    help="both systems: skip SigLIP's unused pooling head (see skip_vision_head)")
    ap.add_argument("--size", choices=["full", "tiny"], default="full", help="tiny: a quick check of this script")
    ap.add_argument("--min-free-gb", type=float, default=14.0, help="memory a child needs to start")
    ap.add_argument("--child", choices=["phimm", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = (child_phimm if args.child == "phimm" else child_transformers)(args)
        Path(args.result).write_text(json.dumps(res, indent=2))
        return

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    need = 11_148_920_768 + 1_661_000_000 + 9_487_000_000 + 1_661_000_000
    free = shutil.disk_usage(root).free
    print(f"disk: {free / 1e9:.1f} GB free at {root}, ~{need / 1e9:.1f} GB needed", flush=True)
    subprocess.run(["df", "-h", str(root), "/tmp"])
    if args.size == "tiny":
        need, args.min_free_gb = 10**8, 1.0
    if not args.reuse and free < need * 1.05:
        raise SystemExit("not enough disk space")
    try:
        t = time.perf_counter()
        orig_dir, native_dir = write_checkpoints(root, args)
        print(f"checkpoints ready in {time.perf_counter() - t:.1f} s", flush=True)
        res = {}
        for kind, folder in (("phimm", orig_dir), ("transformers", native_dir)):
            if args.only and kind != args.only:
                continue
            res[kind] = run_child(kind, folder, root / f"{kind}.json", args)
        report(orig_dir, res, args)
    finally:
        if not args.keep:
            for d in ("original", "native"):
                shutil.rmtree(root / d, ignore_errors=True)
            print(f"\ndeleted the checkpoints under {root}")


if __name__ == "__main__":
    main()
