"""phimm's training recipe for the embedded default model (a tiny Phi-4-multimodal on the toy domain).

    python -m phimm.train --run runs/embedded --export phimm/embedded [--seed 0] [--preset full|test]
    phimm train ...

Stages (each in `{run}/{stage}/`: `log.jsonl` of losses, `state.pt` while running, `done.json` when finished;
rerunning skips finished stages and resumes an interrupted one from its last state):

    lm                  base LM: soft-token transcripts alone first, then with domain text and slot grids
    speech_encoder      conformer + word-level CTC head                                    (independent)
    spoken_pool         spoken questions read by the trained speech encoder, for lm_anneal (speech_encoder)
    vision_encoder      SigLIP + colour-slot classifier on freshly drawn scenes            (independent)
    lm_anneal           (lm_anneal_steps > 0) the decoder alone, more steps on its own task mix, spoken
                        questions from spoken_pool; the base is frozen afterwards          (lm, spoken_pool)
    speech              speech projector (MSE to soft tokens) + speech LoRA end to end     (lm_anneal, speech_encoder)
    vision              vision projector (MSE to soft tokens) + vision LoRA end to end     (lm_anneal, vision_encoder)
    vision_speech_data  vision_speech's spoken questions, synthesised ahead                (independent)
    vision_speech       vision-speech projector, end to end on spoken image questions      (speech, vision,
                                                                                            vision_speech_data)
    export              phimm's checkpoint layout (`phimm.load(dir)`)
    eval                held-out scores through `phimm.load` -> `{run}/scores.json`

Independent stages run as parallel processes (`--workers`, one torch thread each; a stage that never runs beside
another gets every worker's thread).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# in launch order: with two workers, the LM chain (lm, then lm_anneal) runs beside the encoder chain
# (speech_encoder, spoken_pool for lm_anneal, then vision_encoder), and the two end about together
STAGES = ("lm", "speech_encoder", "spoken_pool", "vision_encoder", "lm_anneal", "speech", "vision",
          "vision_speech_data", "vision_speech", "export", "eval")
DEPS = {
    "lm": (),
    "lm_anneal": ("lm", "spoken_pool"),
    "speech_encoder": (),
    "spoken_pool": ("speech_encoder",),
    "vision_encoder": (),
    "speech": ("lm_anneal", "speech_encoder"),
    "vision": ("lm_anneal", "vision_encoder"),
    "vision_speech_data": (),
    "vision_speech": ("speech", "vision", "vision_speech_data"),
    "export": ("vision_speech",),
    "eval": ("export",),
}


# stage -> (module of phimm.train, its function); export and eval also take the export folder
RUNNERS = {
    "lm": ("lm", "run"), "lm_anneal": ("lm", "run_anneal"), "spoken_pool": ("lm", "run_pool"),
    "speech_encoder": ("speech", "run_encoder"), "speech": ("speech", "run_adapt"),
    "vision_encoder": ("vision", "run_encoder"), "vision": ("vision", "run_adapt"),
    "vision_speech_data": ("vision_speech", "run_data"), "vision_speech": ("vision_speech", "run"),
    "export": ("export", "run"), "eval": ("evaluate", "run"),
}


def run_stage(name: str, run_dir: Path, export_dir: Path | None = None) -> None:
    import importlib

    from .common import Options, setup_threads

    if name not in RUNNERS:
        raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
    setup_threads()
    opts = Options.load(run_dir / "options.json")
    module, func = RUNNERS[name]
    fn = getattr(importlib.import_module(f"{__name__}.{module}"), func)
    if name in ("export", "eval"):
        fn(run_dir, opts, export_dir)
    else:
        fn(run_dir, opts)


def ancestors(name: str) -> set[str]:
    out: set[str] = set()
    todo = list(DEPS[name])
    while todo:
        d = todo.pop()
        if d not in out:
            out.add(d)
            todo.extend(DEPS[d])
    return out


def threads_for(name: str, stages, workers: int) -> int:
    """`workers` torch threads for a stage that can never run beside another of `stages` (those still to run: each
    other one is before or after it in the dependency graph), else 1. Decided by the graph, not by timing, so a
    stage trains with the same thread count, hence the same arithmetic, whenever the recipe runs from nothing."""
    beside = [s for s in stages if s != name and s not in ancestors(name) and name not in ancestors(s)]
    return 1 if beside else max(1, workers)


def _done(run_dir: Path, name: str) -> bool:
    return (run_dir / name / "done.json").is_file()


def run_recipe(run_dir: Path, export_dir: Path, workers: int, stages=STAGES) -> dict:
    """Run the stages not yet finished, independent ones in parallel worker processes."""
    t0 = time.time()
    pending = [s for s in STAGES if s in stages and not _done(run_dir, s)]
    to_run = tuple(pending)
    running: dict[str, subprocess.Popen] = {}
    while pending or running:
        for name, proc in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[name]
            if rc != 0 or not _done(run_dir, name):
                for p in running.values():
                    p.terminate()
                raise RuntimeError(f"stage {name} failed (exit {rc}); see {run_dir / name / 'stderr.txt'}")
        for name in list(pending):
            if len(running) >= workers:
                break
            deps = [d for d in DEPS[name] if d in stages]
            if all(_done(run_dir, d) for d in deps):
                pending.remove(name)
                cmd = [sys.executable, "-m", "phimm.train", "--run", str(run_dir), "--export", str(export_dir),
                       "--stage", name]
                err = open(run_dir / f"{name}.stderr.txt", "w")
                n = threads_for(name, to_run, workers)
                print(f"[phimm train] start {name}" + (f" ({n} threads)" if n > 1 else ""), flush=True)
                env = dict(os.environ, PHIMM_TRAIN_THREADS=str(n), OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
                running[name] = subprocess.Popen(cmd, env=env, stderr=err)
        time.sleep(0.5)
    summary = {s: json.loads((run_dir / s / "done.json").read_text()).get("wall_s") for s in STAGES
               if _done(run_dir, s)}
    summary["this_invocation_s"] = round(time.time() - t0, 1)
    (run_dir / "timings.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default="runs/embedded", help="run folder (state, logs, scores)")
    p.add_argument("--export", default=None, help="where to write the model (default: {run}/model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="full", help="full (the shipped model) or test (a tiny end-to-end run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an option")
    p.add_argument("--workers", type=int, default=None, help="parallel stage processes (default 2)")
    p.add_argument("--stage", default=None, help="run only this stage (in this process)")
    p.add_argument("--stages", default=None, help="comma-separated stages to run (default: all)")


def cmd_train(args) -> int:
    from .common import PRESETS, Options

    run_dir = Path(args.run)
    run_dir.mkdir(parents=True, exist_ok=True)
    export_dir = Path(args.export) if args.export else run_dir / "model"
    opts_path = run_dir / "options.json"
    if not opts_path.is_file():
        if args.preset not in PRESETS:
            raise SystemExit(f"unknown preset {args.preset!r}; expected one of {sorted(PRESETS)}")
        opts = Options(seed=args.seed, **PRESETS[args.preset])
        for kv in args.set:
            k, _, v = kv.partition("=")
            setattr(opts, k, parse_option(opts, k, v))
        opts.save(opts_path)
    if args.stage:
        run_stage(args.stage, run_dir, export_dir)
        return 0
    opts = Options.load(opts_path)
    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    summary = run_recipe(run_dir, export_dir, args.workers or opts.workers, stages)
    print(json.dumps(summary, indent=2))
    return 0


def parse_option(opts, key: str, value: str):
    """`--set key=value` as the option's own type (booleans: true/false, 1/0, yes/no); SystemExit saying what is
    wrong for an unknown key or a value of the wrong type."""
    fields = type(opts).__dataclass_fields__
    if key not in fields:
        raise SystemExit(f"unknown option {key!r}; known: {', '.join(fields)}")
    kind = type(getattr(opts, key))
    if kind is bool:
        truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        word = truth.get(value.strip().lower())
        if word is None:
            raise SystemExit(f"option {key} is a boolean; got {value!r} (use true or false)")
        return word
    try:
        return kind(value)
    except ValueError:
        raise SystemExit(f"option {key} is {kind.__name__}; got {value!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the embedded toy-domain model with phimm's recipe")
    add_arguments(p)
    p.set_defaults(func=cmd_train)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phimm.train", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return cmd_train(p.parse_args(argv))
