"""`python -m phimm.train.seeds`: the summary over seeds (targets per run, mean and range) from runs' scores."""

from __future__ import annotations

from phimm.train.options import PRESETS, options_for
from phimm.train.seeds import markdown, meets, summarize


def test_summary_over_seeds():
    good = {"asr_wer": 0.03, "vqa_acc": 0.97, "spoken_vqa_acc": 0.93, "text_route_bit_identical": True}
    bad = {"asr_wer": 0.195, "vqa_acc": 0.96, "spoken_vqa_acc": 0.90, "text_route_bit_identical": True}
    assert all(meets(good).values()) and meets(bad) == {"asr_wer": False, "vqa_acc": True, "spoken_vqa_acc": True,
                                                         "text_route_bit_identical": True}
    s = summarize({0: {"scores": good, "wall_s": 2400.0}, 1: {"scores": bad, "wall_s": 2800.0}}, "full")
    assert s["all_met"] == 1
    assert s["runs"][1]["meets"]["time"] is False  # 46.7 min > 45 min
    assert abs(s["stats"]["asr_wer"]["mean"] - 0.1125) < 1e-9 and s["stats"]["vqa_acc"]["min"] == 0.96
    md = markdown(s)
    assert "| 1 | 19.5 % | 96.0 % | 90.0 % | True | 46.7 min | no |" in md


def test_reduced_preset_keeps_the_models_sizes():
    full, reduced = options_for("full", 0, []), options_for("reduced", 0, [])
    assert reduced.lm_hidden == full.lm_hidden and reduced.vision_hidden == full.vision_hidden
    assert reduced.lm_steps * 3 < full.lm_steps and set(PRESETS["reduced"]) <= set(vars(full))


def test_diagnostics_read_the_binding_step_and_the_ctc_wer(tmp_path):
    import json

    from phimm.train.seeds import diagnostics

    (tmp_path / "lm").mkdir()
    (tmp_path / "speech_encoder").mkdir()
    log = [{"event": "start", "eval_acc": {"vqa": 0.0}}, {"step": 0, "loss": 6.0},
           {"event": "eval", "step": 500, "eval_acc": {"vqa": 0.41}}, {"step": 990, "loss": 1.0},
           {"event": "eval", "step": 1000, "eval_acc": {"vqa": 0.93}},
           {"event": "eval", "step": 1500, "eval_acc": {"vqa": 0.97}}]
    (tmp_path / "lm" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (tmp_path / "speech_encoder" / "done.json").write_text(json.dumps({"heldout_ctc_wer": 0.0615}))
    assert diagnostics(tmp_path) == {"binding_step": 1000, "ctc_wer": 0.0615}
    never = [{"step": 10, "loss": 1.0}, {"event": "end", "eval_acc": {"vqa": 0.5}}]
    (tmp_path / "lm" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in never))
    assert diagnostics(tmp_path)["binding_step"] is None
    row = summarize({0: {"scores": {"asr_wer": 0.1}, "wall_s": 60.0, "binding_step": None, "ctc_wer": 0.2}},
                    "reduced")["runs"][0]
    assert "| not reached | 20.0 % |" in markdown({"preset": "reduced", "runs": [row], "stats": {}, "all_met": 0})
