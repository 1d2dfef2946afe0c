"""The training recipe end to end on a few hundred samples (tiny sizes): every stage runs, writes its log and
state, losses fall, answers improve, the export loads through `phimm.load`, and a rerun skips finished stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _log(run: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run / stage / "log.jsonl").read_text().splitlines()]


def _first_last(recs: list[dict], key: str, phase: str | None = None) -> tuple[float, float]:
    vals = [r[key] for r in recs if key in r and (phase is None or r.get("phase") == phase)]
    assert len(vals) >= 2, f"too few {key} records"
    k = max(1, len(vals) // 5)  # average the first and last fifths: single batches are noisy
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("recipe") / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PHIMM_TRAIN_QUIET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "phimm.train", "--run", str(run), "--preset", "test", "--seed", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return run


def test_every_stage_finished_with_logs(run):
    from phimm.train import STAGES

    for stage in STAGES:
        done = json.loads((run / stage / "done.json").read_text())
        assert done["wall_s"] >= 0
        assert (run / stage / "log.jsonl").is_file() or stage == "export"
        assert not (run / stage / "state.pt").exists()  # finished stages drop their resume state
    assert json.loads((run / "options.json").read_text())["seed"] == 3


def test_losses_fall(run):
    first, last = _first_last(_log(run, "lm"), "loss")
    assert last < 0.7 * first
    first, last = _first_last(_log(run, "speech_encoder"), "loss")
    assert last < first
    first, last = _first_last(_log(run, "vision_encoder"), "loss")
    assert last < first
    first, last = _first_last(_log(run, "speech"), "rel_mse", "projector")
    assert last < 0.5 * first
    first, last = _first_last(_log(run, "vision"), "rel_mse", "projector")
    assert last < 0.5 * first


def test_outputs_improve(run):
    lm = _log(run, "lm")
    start = next(r["eval_acc"] for r in lm if r.get("event") == "start")
    end = next(r["eval_acc"] for r in lm if r.get("event") == "end")
    for task in start:
        assert end[task] > start[task], (task, start, end)
    for stage in ("speech", "vision"):
        done = json.loads((run / stage / "done.json").read_text())
        assert done["answer_acc_after"] >= done["answer_acc_before"], (stage, done)


def test_export_loads_and_scores(run):
    import phimm

    scores = json.loads((run / "scores.json").read_text())
    for key in ("asr_wer", "vqa_acc", "spoken_vqa_acc", "text_acc"):
        assert key in scores
    assert scores["text_route_bit_identical"] is True
    pipe = phimm.load(run / "model")
    assert sorted(pipe.adapters) == ["speech", "vision"]
    out = pipe("what color is the circle", max_new_tokens=4)
    assert out.route.adapter is None


def test_rerun_skips_finished_stages(run):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PHIMM_TRAIN_QUIET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "phimm.train", "--run", str(run)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "start" not in proc.stdout
    assert json.loads((run / "timings.json").read_text())["this_invocation_s"] < 10
