"""phimm's training recipe for the embedded default model (a tiny Phi-4-multimodal on the toy domain).

    python -m phimm.train --run runs/embedded --export phimm/embedded [--seed 0] [--preset full|test] [--sequential]
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

Each stage runs in a process of its own (`phimm.train.schedule`): independent ones in parallel (`--workers`, one
torch thread each; a stage that never runs beside another gets every worker's thread), or one after another with
`--sequential` (each with the thread count it has in parallel: the same numbers).

Modules: `options` (the options, grouped by stage, and presets), `schedule` (stages, dependencies, running them),
`trainer` (the training loop the stages share), `common` (run folder, model, soft-token vocabulary, LM loss), one
module per group of stages (`lm`, `speech`, `vision`, `vision_speech`, `export`, `evaluate`), `probe`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import GROUPS, PRESETS, Options, options_for, parse_option
from .schedule import DEPS, RUNNERS, STAGES, ancestors, run_recipe, run_stage, threads_for

__all__ = ["DEPS", "GROUPS", "PRESETS", "RUNNERS", "STAGES", "Options", "ancestors", "add_arguments", "cmd_train",
           "main", "options_for", "parse_option", "register", "run_recipe", "run_stage", "threads_for"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default="runs/embedded", help="run folder (state, logs, scores)")
    p.add_argument("--export", default=None, help="where to write the model (default: {run}/model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="full", help="full (the shipped model) or test (a tiny end-to-end run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an option")
    p.add_argument("--workers", type=int, default=None, help="parallel stage processes (default 2)")
    p.add_argument("--sequential", action="store_true",
                   help="run the stages one after another (same numbers as in parallel, each stage with the threads "
                        "it has there)")
    p.add_argument("--stage", default=None, help="run only this stage (in this process)")
    p.add_argument("--composition", default=None,
                   help="train a saved composition's projectors and adapters instead (phimm.train.composition); "
                        "--export is then required, --stages picks among vision,speech,vision_speech, --set takes "
                        "steps, batch, lr, rank, examples")
    p.add_argument("--stages", default=None, help="comma-separated stages to run (default: all)")


def cmd_train(args) -> int:
    if getattr(args, "composition", None):
        return _train_composition(args)
    run_dir = Path(args.run)
    run_dir.mkdir(parents=True, exist_ok=True)
    export_dir = Path(args.export) if args.export else run_dir / "model"
    opts_path = run_dir / "options.json"
    if not opts_path.is_file():
        options_for(args.preset, args.seed, args.set).save(opts_path)
    if args.stage:
        run_stage(args.stage, run_dir, export_dir)
        return 0
    opts = Options.load(opts_path)
    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    summary = run_recipe(run_dir, export_dir, args.workers or opts.workers, stages,
                         sequential=getattr(args, "sequential", False))
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the embedded toy-domain model with phimm's recipe")
    add_arguments(p)
    p.set_defaults(func=cmd_train)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phimm.train", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return cmd_train(p.parse_args(argv))


def _train_composition(args) -> int:
    from .composition import STAGES as COMPOSITION_STAGES
    from .composition import run_composition

    if not args.export:
        raise SystemExit("phimm train --composition DIR needs --export OUT")
    overrides = {"seed": args.seed}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = float(value) if key == "lr" else int(value)
    stages = tuple(args.stages.split(",")) if args.stages else COMPOSITION_STAGES
    report = run_composition(args.composition, args.export, stages, overrides)
    print(json.dumps(report, indent=2))
    return 0
