"""`phimm bench`: its figures' definitions (checkpoint bytes, bandwidth methods) and one quick run end to end."""

import json

import torch
from safetensors.torch import save_file

from phimm import bench


def test_checkpoint_bytes_counts_floats_at_the_dtype(tmp_path):
    save_file({"w": torch.zeros(10, 4), "ids": torch.zeros(3, dtype=torch.int64)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "vision-lora").mkdir()
    save_file({"a": torch.zeros(2, 4, dtype=torch.bfloat16)}, str(tmp_path / "vision-lora" / "adapter_model.safetensors"))
    # floats counted at the run's dtype, integers as stored; adapter folders included
    assert bench.checkpoint_bytes(tmp_path, torch.bfloat16) == 40 * 2 + 3 * 8 + 8 * 2
    assert bench.checkpoint_bytes(tmp_path, torch.float32) == 40 * 4 + 3 * 8 + 8 * 4


def test_bandwidths_report_each_method_and_the_best():
    bw = bench.measure_bandwidths(mb=64, repeats=2)
    assert set(bw) == {"sum", "dot", "copy", "best"}
    assert all(v > 0 for v in bw.values())
    assert bw["best"] == max(bw["sum"], bw["dot"], bw["copy"])


def test_quick_bench_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--workdir", str(tmp_path), "--json", str(out),
                       "--markdown", str(tmp_path / "bench.md")]) == 0
    r = json.loads(out.read_text())
    assert r["size"] == "quick"
    assert r["bandwidth_gbs"] == r["bandwidth"]["best"]
    mem = r["memory"]
    assert mem["checkpoint_mb"] > 0 and mem["phimm_over_checkpoint"] == mem["phimm_weights_rss_mb"] / mem["checkpoint_mb"]
    assert set(r["single"]) == {"text", "image", "audio", "image+audio"}
    for kind, v in r["single"].items():
        assert v["bandwidth_fraction"] > 0
        # adapter routes read their adapter's bytes besides the base's
        assert (v["bytes_per_token"] > r["decode_weight_bytes"]) == (kind != "text")
    assert r["mixed"]["rows_match"] and len(r["mixed"]["speedup_each"]) == 1
    assert set(r["int8"]["routes"]) == set(r["single"])
    assert {"decode_speedup", "bytes_ratio", "agreement"} <= set(r["int4"])
    assert "| memory (RSS after loading and one request of each route) |" in (tmp_path / "bench.md").read_text()
