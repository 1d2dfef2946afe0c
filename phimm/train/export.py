"""Stage `export`: the trained parts assembled into one `Phi4MultimodalForCausalLM` + peft `vision-lora/` and
`speech-lora/`, written in phimm's checkpoint layout by `Pipeline.save_pretrained` (so `phimm.load(dir)` runs it
like any checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .common import Options, Stage, Timer, apply_parts, load_base, lora_adapter

PARTS = ["speech_encoder", "speech", "vision_encoder", "vision", "vision_speech"]
KEEP = {"README.md"}


def run(run_dir, opts: Options, export_dir: Path | None) -> None:
    from ..model import Phi4MMComposition
    from ..pipeline import Pipeline

    stage = Stage(run_dir, "export")
    if stage.done:
        return
    timer = Timer()
    out = Path(export_dir) if export_dir is not None else Path(run_dir) / "model"
    hf, proc = load_base(run_dir)
    apply_parts(hf, run_dir, PARTS)
    # the vision LoRA as the vision-speech stage left it, if it fine-tuned it (vs_lora_lr > 0)
    vision_lora = "vision_speech" if (Path(run_dir) / "vision_speech" / "lora.pt").is_file() else "vision"
    adapters = {
        name: lora_adapter(name, torch.load(Path(run_dir) / stage_name / "lora.pt", weights_only=True), opts.lora_r)
        for name, stage_name in (("vision", vision_lora), ("speech", "speech"))
    }
    model = Phi4MMComposition(hf, adapters)
    meta = {"generation": {"max_new_tokens": 24},
            "trained_by": {"recipe": "python -m phimm.train", "seed": opts.seed}}
    if out.exists():
        for p in out.iterdir():
            if p.name in KEEP:
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    Pipeline(model, proc, meta=meta).save_pretrained(out)
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    stage.finish(wall_s=timer(), out=str(out), safetensors_bytes=size)
    (Path(run_dir) / "export" / "files.json").write_text(
        json.dumps(sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()), indent=2))
