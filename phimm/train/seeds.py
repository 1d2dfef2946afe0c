"""The recipe over several seeds: the spread of its end-to-end scores, before a change of defaults is trusted.

    python -m phimm.train.seeds --seeds 0,1,2 --preset reduced --out runs/seeds     # about a quarter of a full run each
    python -m phimm.train.seeds --seeds 0,1,2 --preset full --out runs/seeds-full   # the model card's table

Each seed is one run from nothing (`python -m phimm.train --run {out}/seed{S} --preset P --seed S`, its own
process, stages as the recipe schedules them); its `scores.json` comes from the recipe's `eval` stage (held-out
toy data). The summary (`{out}/seeds.json`, `{out}/seeds.md`) gives each run's scores and wall time, the mean and
range of each, and which runs meet the targets (ASR WER <= 5 %, VQA >= 95 %, spoken questions >= 90 %, text route
bit-identical, <= 45 min for a full run). A seed whose run folder already holds scores is not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {"asr_wer": ("<=", 0.05), "vqa_acc": (">=", 0.95), "spoken_vqa_acc": (">=", 0.90),
           "text_route_bit_identical": ("==", True)}
FULL_RUN_LIMIT_S = 45 * 60


def meets(scores: dict) -> dict[str, bool]:
    out = {}
    for key, (op, want) in TARGETS.items():
        got = scores.get(key)
        out[key] = got is not None and (got <= want if op == "<=" else got >= want if op == ">=" else got == want)
    return out


def heldout_scores(run_dir: Path, heldout: Path) -> dict:
    """The run's exported model through `phimm eval` on the held-out sets made by `python -m phimm.toy.data
    --heldout` (`{heldout}/asr/asr.jsonl`, `vqa/vqa.jsonl`, `spoken_vqa/spoken_vqa.jsonl`): ASR WER on the toy
    normalisation (lower case, no punctuation; the Whisper-style figure beside it), exact-match accuracies.
    Results in `{run}/heldout-eval/{set}/`; a set already scored there is read, not run again."""
    model = Path(run_dir) / "model"
    out = {}
    sets = {"asr": ("asr", "--manifest", heldout / "asr" / "asr.jsonl"),
            "vqa": ("vqa", "--data", heldout / "vqa" / "vqa.jsonl"),
            "spoken_vqa": ("vqa", "--data", heldout / "spoken_vqa" / "spoken_vqa.jsonl")}
    for name, (task, flag, data) in sets.items():
        dest = Path(run_dir) / "heldout-eval" / name
        summary = dest / "summary.json"
        if not summary.is_file():
            subprocess.run([sys.executable, "-m", "phimm.cli", "eval", task, flag, str(data), "--model", str(model),
                            "--out", str(dest), "--no-progress"], check=True)
        got = json.loads(summary.read_text())
        if name == "asr":
            out.update(asr_wer=got["wer_raw"], asr_wer_whisper=got["wer"], asr_n=got["count"])
        else:
            out[f"{name}_acc"] = got["exact_match"]
    return out


def diagnostics(run_dir: Path) -> dict:
    """Where a run's variance shows: the LM step at which held-in VQA reached 90 % (the slot binding found; None
    if it never did), and the speech encoder's own held-out CTC WER."""
    from .lm import binding_step

    enc = Path(run_dir) / "speech_encoder" / "done.json"
    ctc = json.loads(enc.read_text()).get("heldout_ctc_wer") if enc.is_file() else None
    return {"binding_step": binding_step(Path(run_dir) / "lm" / "log.jsonl"), "ctc_wer": ctc}


def summarize(runs: dict[int, dict], preset: str) -> dict:
    """`runs[seed] = {"scores": ..., "wall_s": ...}` -> per-run rows, mean / min / max, targets met."""
    rows = []
    for seed, r in sorted(runs.items()):
        s = r["scores"]
        ok = meets(s)
        if preset == "full":
            ok["time"] = r["wall_s"] is not None and r["wall_s"] <= FULL_RUN_LIMIT_S
        rows.append({"seed": seed, "wall_s": r["wall_s"], **{k: s.get(k) for k in TARGETS}, "meets": ok,
                     "all_met": all(ok.values()), "binding_step": r.get("binding_step"), "ctc_wer": r.get("ctc_wer")})
    stats = {}
    for key in ("asr_wer", "vqa_acc", "spoken_vqa_acc"):
        vals = [row[key] for row in rows if row[key] is not None]
        if vals:
            stats[key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
    return {"preset": preset, "runs": rows, "stats": stats, "all_met": sum(row["all_met"] for row in rows)}


def markdown(summary: dict) -> str:
    scored = f" Scored on {summary['scored_on']}." if summary.get("scored_on") else ""
    lines = [f"Preset `{summary['preset']}`, {len(summary['runs'])} seeds; targets met by "
             f"{summary['all_met']}/{len(summary['runs'])} runs.{scored}", "",
             "| seed | ASR WER | VQA | spoken VQA | text bit-identical | wall | all targets | slot binding (LM step) "
             "| speech encoder CTC WER |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        def pct(v):
            return "—" if v is None else f"{100 * v:.1f} %"
        wall = "—" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f} min"
        bind = r.get("binding_step")
        lines.append(f"| {r['seed']} | {pct(r['asr_wer'])} | {pct(r['vqa_acc'])} | {pct(r['spoken_vqa_acc'])} | "
                     f"{r['text_route_bit_identical']} | {wall} | {'yes' if r['all_met'] else 'no'} | "
                     f"{'not reached' if bind is None else bind} | {pct(r.get('ctc_wer'))} |")
    for key, st in summary["stats"].items():
        lines.append(f"\n{key}: mean {100 * st['mean']:.1f} %, range {100 * st['min']:.1f}-{100 * st['max']:.1f} %")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phimm.train.seeds", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--preset", default="reduced", help="reduced (default), full, or test")
    p.add_argument("--out", default="runs/seeds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an option for every run")
    p.add_argument("--heldout", default=None, metavar="DIR",
                   help="score every run through `phimm eval` on the held-out sets in DIR (made by `python -m "
                        "phimm.toy.data --heldout`, as in the README) instead of the recipe's own eval stage")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        run_dir = out / f"seed{seed}"
        scores_file = run_dir / "scores.json"
        wall = None
        if not scores_file.is_file():
            cmd = [sys.executable, "-m", "phimm.train", "--run", str(run_dir), "--preset", args.preset,
                   "--seed", str(seed)] + [a for kv in args.set for a in ("--set", kv)]
            print(f"[seeds] seed {seed}: {' '.join(cmd)}", flush=True)
            t = time.perf_counter()
            subprocess.run(cmd, check=True)
            wall = time.perf_counter() - t
            (run_dir / "wall_s.json").write_text(json.dumps({"wall_s": wall}) + "\n")
        elif (run_dir / "wall_s.json").is_file():
            wall = json.loads((run_dir / "wall_s.json").read_text())["wall_s"]
        scores = json.loads(scores_file.read_text())
        if args.heldout:  # the text route's check stays the eval stage's
            scores = {**scores, **heldout_scores(run_dir, Path(args.heldout))}
        runs[seed] = {"scores": scores, "wall_s": wall, **diagnostics(run_dir)}
        summary = summarize(runs, args.preset)
        summary["scored_on"] = (f"`phimm eval` on {args.heldout}" if args.heldout
                                else "the recipe's eval stage (held-out toy data, seed + 7919)")
        (out / "seeds.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "seeds.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
