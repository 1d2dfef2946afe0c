"""`benchmarks/gpu_check.py --device cpu --size quick`: the GPU check's own code, run here so that it cannot rot
between the sessions that have a GPU. Parity (phimm against transformers + peft, four routes, alone and mixed)
must hold; the full-size phases must run on both systems and write their figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_mode(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--size",
                           "quick", "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["errors"] == {}
    assert res["parity"]["ok"] is True
    for route, row in res["parity"]["routes"].items():
        for kind in ("alone", "mixed"):
            assert row[kind]["tokens_equal"] and row[kind]["max_first_logit_diff"] <= 1e-4, (route, kind, row)
    phimm_res, ref = res["full"]["phimm"], res["full"]["reference"]
    assert phimm_res["mixed"]["errors"] == [] and phimm_res["mixed"]["requests"] == 8
    assert phimm_res["mixed"]["routes"] == ["none", "speech", "vision", "vision+vision_speech"]
    assert set(phimm_res["single"]) == set(ref["single"]) == {"text", "image", "audio", "image+audio"}
    assert res["full"]["first_logits_text_max_diff_bf16"] < 0.05  # the same seed built the same weights twice
    assert res["bandwidth"]["best_gbs"] > 0 and "mixed_speedup" in res["summary"]
    assert "| text |" in proc.stdout
