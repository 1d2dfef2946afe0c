"""`phimm train-router`: learn a router (`routers.LearnedRouter`) from labelled examples, and measure it.

    phimm train-router --data examples.jsonl --out router/ [--model PATH] [--eval heldout.jsonl]
    phimm train-router --toy runs/router-toy --out router/      # make toy-domain examples first, then the same

`examples.jsonl`: one request per line, `{"prompt": ..., "images": [paths], "audios": [paths], "adapter": name or
null}` (media paths relative to the file). Each example goes through the frozen base model once (its pooled
prompt embedding); the router is a softmax regression over those. Writes `router.json` + `router.safetensors` to
`--out`, and `scores.json` (training and held-out accuracy, per label, and the embedding's cost per request).
Load it with `phimm.load(path, router=LearnedRouter.load("router/"))`; `pipe.save_pretrained` saves it with the
model.

`--toy DIR`: the toy domain's version of LoRA-Whisper's per-language speech adapters: two speech adapters for two
kinds of utterance (`speech-digits` for spoken digit strings, `speech` for spoken shapes and questions), beside
`vision` for images and none for text; training examples from the toy data's training split, held-out ones from
its held-out split (other voices, another seed).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch


def read_examples(path: str | Path) -> list[tuple]:
    """(Request, label) for each line of a JSONL file."""
    from .types import Request

    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            req = Request(prompt=rec.get("prompt") or "", images=[str(path.parent / p) for p in rec.get("images", [])],
                          audios=[str(path.parent / p) for p in rec.get("audios", [])])
            out.append((req, rec.get("adapter")))
        except (json.JSONDecodeError, AttributeError, TypeError) as e:
            from .errors import PromptError

            raise PromptError(f"{path}:{n}: not an example ({{'prompt', 'images', 'audios', 'adapter'}}): {e}") \
                from None
    return out


def embed_examples(pipe, examples, desc: str = "embedding") -> tuple[torch.Tensor, float]:
    """`[N, H]` pooled prompt embeddings, and the mean seconds one took."""
    from tqdm import tqdm

    feats, spent = [], 0.0
    for req, _ in tqdm(examples, desc=desc, unit="example", leave=False):
        prepared = pipe.processor.prepare(req)
        t = time.perf_counter()
        feats.append(pipe.model.route_features(prepared))
        spent += time.perf_counter() - t
    return torch.stack(feats), spent / max(len(examples), 1)


def accuracy(router, feats: torch.Tensor, labels) -> dict:
    pred = router.predict(feats)
    by = Counter(labels)
    right = Counter(y for y, p in zip(labels, pred) if y == p)
    return {"accuracy": sum(right.values()) / max(len(labels), 1), "examples": len(labels),
            "per_label": {str(k): right[k] / n for k, n in by.items()}}


def toy_examples(folder: str | Path, n: int, seed: int, heldout: bool) -> Path:
    """Write toy-domain examples (media files and `examples.jsonl`) for the router: text (no adapter), images
    (`vision`), spoken digits (`speech-digits`), spoken shapes and questions (`speech`)."""
    import soundfile as sf

    from .toy import data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    per = max(1, n // 4)
    for i, s in enumerate(data.iter_split("text", per, seed, heldout=heldout)):
        lines.append({"prompt": s["prompt"], "adapter": None})
    for i, s in enumerate(data.iter_split("vqa", per, seed, heldout=heldout)):
        name = f"image-{i}.png"
        s["image"].save(folder / name)
        lines.append({"prompt": "<|image|>" + s["question"], "images": [name], "adapter": "vision"})
    for i, s in enumerate(data.iter_split("asr", 2 * per, seed, heldout=heldout, sample_rate=16000)):
        name = f"audio-{i}.wav"
        sf.write(folder / name, s["audio"], s["sample_rate"])
        label = "speech-digits" if s["utterance_kind"] == "digits" else "speech"
        lines.append({"prompt": "<|audio|>Transcribe the audio clip into text.", "audios": [name], "adapter": label})
    out = folder / "examples.jsonl"
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return out


def cmd_train_router(args) -> int:
    import phimm
    from routers import LearnedRouter

    data, heldout = args.data, args.eval
    if args.toy:
        data = toy_examples(Path(args.toy) / "train", args.toy_n, args.seed, heldout=False)
        heldout = heldout or toy_examples(Path(args.toy) / "heldout", args.toy_n // 2, args.seed + 1, heldout=True)
    if data is None:
        raise SystemExit("phimm train-router: give --data examples.jsonl (or --toy DIR)")
    pipe = phimm.load(args.model, threads=args.threads)
    train = read_examples(data)
    feats, per_example = embed_examples(pipe, train, "train examples")
    labels = [y for _, y in train]
    t = time.perf_counter()
    router = LearnedRouter.fit(feats, labels, steps=args.steps, seed=args.seed)
    fit_s = time.perf_counter() - t
    router.save(args.out)
    scores = {"labels": router.labels, "train": accuracy(router, feats, labels), "fit_s": fit_s,
              "embedding_s_per_request": per_example, "model": pipe.name}
    if heldout:
        held = read_examples(heldout)
        hfeats, _ = embed_examples(pipe, held, "held-out examples")
        scores["heldout"] = accuracy(router, hfeats, [y for _, y in held])
    # what routing by content costs a request: the embedding forward against the request itself
    probe = train[min(len(train) - 1, len(train) // 2)][0]
    alone = min((pipe(probe, max_new_tokens=args.cost_tokens, min_new_tokens=args.cost_tokens).total_s or 0.0)
                for _ in range(3))
    scores["request_s_without_routing"] = alone
    scores["routing_overhead"] = per_example / alone if alone else None
    Path(args.out, "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    print(json.dumps({k: v for k, v in scores.items() if k != "labels"}, indent=1))
    pipe.close()
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="labelled examples (JSONL)")
    p.add_argument("--out", required=True, help="folder for the router (router.json, router.safetensors, scores)")
    p.add_argument("--model", default=None, help="the checkpoint whose base model embeds prompts (default: embedded)")
    p.add_argument("--eval", default=None, help="held-out examples (JSONL) to measure the router on")
    p.add_argument("--toy", default=None, help="make toy-domain examples in this folder and train on them")
    p.add_argument("--toy-n", type=int, default=200, help="toy training examples (held-out: half as many)")
    p.add_argument("--steps", type=int, default=500, help="optimiser steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cost-tokens", type=int, default=8, help="new tokens of the request the routing cost is "
                                                              "measured against")


def register(sub) -> None:
    p = sub.add_parser("train-router", help="learn a router from labelled examples (a classifier over the base "
                                            "model's prompt embedding)")
    add_arguments(p)
    p.set_defaults(func=cmd_train_router)
