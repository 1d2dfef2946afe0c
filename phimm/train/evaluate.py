"""Stage `eval`: held-out scores of the exported model, through `phimm.load(dir)` and the public pipeline.

Held-out data: `phimm.toy.data` splits with `heldout=True` (voice variants, rates and pitches training never
used) and other seeds, written to `{run}/heldout/{kind}/` as files + manifests (`phimm eval` reads them too).
Requests are chat messages with content parts in the toy-domain spec's order. Scores -> `{run}/scores.json`.

Scored with `phimm.eval`'s metrics on the toy domain's normalisation (`normalize`: lower case, punctuation
dropped), as the model card's scores are: `asr_wer` is `phimm.eval.metrics.wer` (the corpus rate), the accuracies
`phimm.eval.metrics.exact_match`. Not Whisper's English normaliser: it writes the toy transcripts' number words
as digits and joins them ("seven seven one eight six" -> "77186"), so a five-word reference counts as one word; nor
VQAv2 accuracy: its 2016 evaluation turns the predicted "two" into "2" but not the ten identical toy answers, so
every right "how many" answer would count as wrong. (The shipped model: WER 3.5 %, 3.9 % after Whisper's
normaliser; VQA 99.0 %, 74.0 % as VQAv2 accuracy; exact match 99.0 %.)
"""

from __future__ import annotations

import json
import re
import string
import time
from pathlib import Path

import torch

from ..eval.metrics import exact_match, wer
from ..toy import data as toy_data
from ..toy import domain
from .common import Options, Stage, Timer

HELDOUT_SEED_OFFSET = 7919
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def heldout_split(run_dir: Path, kind: str, n: int, seed: int) -> tuple[Path, list[dict]]:
    folder = Path(run_dir) / "heldout" / kind
    manifest = folder / f"{kind}.jsonl"
    if not manifest.is_file() or len(toy_data.read_manifest(manifest)) != n:
        toy_data.make_split(kind, n, seed + HELDOUT_SEED_OFFSET, folder, heldout=True, keep_media=False)
    return folder, toy_data.read_manifest(manifest)


def requests_for(kind: str, folder: Path, records: list[dict]):
    from .. import Request

    reqs = []
    for r in records:
        if kind == "asr":
            parts = [{"type": "audio", "audio": str(folder / r["audio"])},
                     {"type": "text", "text": domain.ASR_INSTRUCTION}]
        elif kind == "vqa":
            parts = [{"type": "image", "image": str(folder / r["image"])}, {"type": "text", "text": r["question"]}]
        elif kind == "spoken_vqa":
            parts = [{"type": "image", "image": str(folder / r["image"])},
                     {"type": "audio", "audio": str(folder / r["audio"])},
                     {"type": "text", "text": domain.SPOKEN_VQA_INSTRUCTION}]
        else:
            parts = [{"type": "text", "text": r["prompt"]}]
        reqs.append(Request(messages=[{"role": "user", "content": parts}]))
    return reqs


def answer_all(pipe, reqs, batch: int = 16, **gen) -> list:
    outs = []
    for i in range(0, len(reqs), batch):
        outs += pipe(reqs[i: i + batch], **gen)
    return outs


def evaluate(model_dir: Path, run_dir: Path, opts: Options, log=print) -> dict:
    import phimm

    pipe = phimm.load(model_dir, threads=1)
    scores: dict = {}
    n = {"asr": opts.eval_asr, "vqa": opts.eval_vqa, "spoken_vqa": opts.eval_svqa, "text": opts.eval_text}
    for kind in ("asr", "vqa", "spoken_vqa", "text"):
        folder, records = heldout_split(run_dir, kind, n[kind], opts.seed)
        reqs = requests_for(kind, folder, records)
        t = time.time()
        outs = answer_all(pipe, reqs)
        per_req = (time.time() - t) / max(1, len(reqs))
        errors = [o.error for o in outs if o.error is not None]
        if errors:
            raise RuntimeError(f"{kind}: {len(errors)} requests failed, e.g. {errors[0]}")
        hyps = [normalize(o.text) for o in outs]
        if kind == "asr":
            refs = [normalize(r["text"]) for r in records]
            scores["asr_wer"] = round(wer(refs, hyps), 4)
            bad = [(r, h) for r, h in zip(refs, hyps) if r != h]
        else:
            refs = [normalize(r["answers"][0] if "answers" in r else r["answer"]) for r in records]
            right = [exact_match(h, r) for r, h in zip(refs, hyps)]
            scores[f"{kind}_acc"] = round(sum(right) / len(refs), 4)
            bad = [(r, h) for r, h, ok in zip(refs, hyps, right) if not ok]
            if kind in ("vqa", "spoken_vqa"):
                by_type: dict = {}
                for rec, ok in zip(records, right):
                    by_type.setdefault(rec["question_type"], []).append(ok)
                scores[f"{kind}_acc_by_type"] = {k: round(sum(v) / len(v), 4) for k, v in sorted(by_type.items())}
        scores[f"{kind}_n"] = len(records)
        scores[f"{kind}_s_per_request_batched"] = round(per_req, 4)
        log(kind=kind, n=len(records), errors_shown=bad[:8])
    # the text route with and without adapters: bit-identical logits
    base = phimm.load(model_dir, adapters=[], threads=1)
    folder, records = heldout_split(run_dir, "text", n["text"], opts.seed)
    reqs = requests_for("text", folder, records)[:8]
    with_a = answer_all(pipe, reqs, output_logits=True, max_new_tokens=8)
    without = answer_all(base, reqs, output_logits=True, max_new_tokens=8)
    scores["text_route_bit_identical"] = all(
        a.token_ids == b.token_ids and torch.equal(a.logits, b.logits) for a, b in zip(with_a, without))
    # one request alone, as a user makes it
    req = requests_for("vqa", *heldout_split(run_dir, "vqa", n["vqa"], opts.seed))[0]
    pipe(req)
    t = time.time()
    pipe(req)
    scores["single_vqa_request_s"] = round(time.time() - t, 4)
    return scores


def run(run_dir, opts: Options, export_dir: Path | None) -> None:
    stage = Stage(run_dir, "eval")
    if stage.done:
        return
    timer = Timer()
    model_dir = Path(export_dir) if export_dir is not None else Path(run_dir) / "model"
    scores = evaluate(model_dir, Path(run_dir), opts, log=lambda **k: stage.log(**k))
    (Path(run_dir) / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    stage.finish(wall_s=timer(), **{k: v for k, v in scores.items() if not isinstance(v, dict)})
