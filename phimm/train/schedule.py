"""The recipe's stages, what each needs, and how they are run: one after another (`run_sequential`), or the
independent ones in parallel worker processes (`run_parallel`). Either way each stage runs in its own process
(`python -m phimm.train --stage NAME`) with the torch thread count `threads_for` gives it, so both ways compute
the same numbers.

Each stage's folder `{run}/{stage}/` gets `done.json` when it finishes; a stage whose `done.json` exists is skipped.
"""

from __future__ import annotations

import importlib
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
    """Stage `name` in this process, with the run's saved options."""
    from .common import setup_threads
    from .options import Options

    if name not in RUNNERS:
        raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
    setup_threads()
    opts = Options.load(Path(run_dir) / "options.json")
    module, func = RUNNERS[name]
    fn = getattr(importlib.import_module(f"{__package__}.{module}"), func)
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


def done(run_dir: Path, name: str) -> bool:
    return (Path(run_dir) / name / "done.json").is_file()


def launch(name: str, run_dir: Path, export_dir: Path, threads: int) -> subprocess.Popen:
    """`python -m phimm.train --stage name` in a new process with `threads` torch threads, its stderr in
    `{run}/{name}.stderr.txt`."""
    cmd = [sys.executable, "-m", "phimm.train", "--run", str(run_dir), "--export", str(export_dir), "--stage", name]
    err = open(Path(run_dir) / f"{name}.stderr.txt", "w")
    print(f"[phimm train] start {name}" + (f" ({threads} threads)" if threads > 1 else ""), flush=True)
    env = dict(os.environ, PHIMM_TRAIN_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    return subprocess.Popen(cmd, env=env, stderr=err)


def _failed(run_dir: Path, name: str, rc) -> RuntimeError:
    return RuntimeError(f"stage {name} failed (exit {rc}); see {Path(run_dir) / (name + '.stderr.txt')}")


def run_sequential(run_dir: Path, export_dir: Path, workers: int, stages=STAGES) -> None:
    """The stages of `stages` not yet finished, one at a time in `STAGES` order (dependencies first)."""
    to_run = tuple(s for s in STAGES if s in stages and not done(run_dir, s))
    for name in to_run:
        rc = launch(name, run_dir, export_dir, threads_for(name, to_run, workers)).wait()
        if rc != 0 or not done(run_dir, name):
            raise _failed(run_dir, name, rc)


def run_parallel(run_dir: Path, export_dir: Path, workers: int, stages=STAGES) -> None:
    """The stages of `stages` not yet finished, up to `workers` at a time, each as soon as its dependencies are."""
    pending = [s for s in STAGES if s in stages and not done(run_dir, s)]
    to_run = tuple(pending)
    running: dict[str, subprocess.Popen] = {}
    while pending or running:
        for name, proc in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[name]
            if rc != 0 or not done(run_dir, name):
                for p in running.values():
                    p.terminate()
                raise _failed(run_dir, name, rc)
        for name in list(pending):
            if len(running) >= workers:
                break
            if all(done(run_dir, d) for d in DEPS[name] if d in stages):
                pending.remove(name)
                running[name] = launch(name, run_dir, export_dir, threads_for(name, to_run, workers))
        time.sleep(0.5)


def run_recipe(run_dir: Path, export_dir: Path, workers: int, stages=STAGES, sequential: bool = False) -> dict:
    """Run the stages not yet finished (in parallel unless `sequential`); {stage: wall seconds,
    "this_invocation_s": ...}, also written to `{run}/timings.json`."""
    t0 = time.time()
    (run_sequential if sequential else run_parallel)(run_dir, export_dir, workers, stages)
    summary = {s: json.loads((Path(run_dir) / s / "done.json").read_text()).get("wall_s") for s in STAGES
               if done(run_dir, s)}
    summary["this_invocation_s"] = round(time.time() - t0, 1)
    (Path(run_dir) / "timings.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
