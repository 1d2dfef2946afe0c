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
