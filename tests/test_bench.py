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
    for who in ("phimm", "reference"):  # the weights held, tensor by tensor, next to the RSS difference
        held = mem[f"{who}_held"]
        assert held["held"] == held["anonymous"] + held["file_resident"] > 0
        assert mem[f"{who}_held_over_checkpoint"] == mem[f"{who}_weights_held_mb"] / mem["checkpoint_mb"]
    assert set(r["single"]) == {"text", "image", "audio", "image+audio"}
    for kind, v in r["single"].items():
        assert v["bandwidth_fraction"] > 0
        # adapter routes read their adapter's bytes besides the base's
        assert (v["bytes_per_token"] > r["decode_weight_bytes"]) == (kind != "text")
    assert r["mixed"]["rows_match"] and len(r["mixed"]["speedup_each"]) == 1
    assert set(r["int8"]["routes"]) == set(r["single"])
    assert {"decode_speedup", "bytes_ratio", "agreement"} <= set(r["int4"])
    assert "| memory (RSS after loading and one request of each route) |" in (tmp_path / "bench.md").read_text()


def test_held_weight_bytes_counts_own_copies_and_only_the_mapped_pages_read(tmp_path):
    """`held_weight_bytes`: a module's own tensors count whole, each storage once, tensors kept by weight-format
    objects included; a tensor mapped from a file counts only by the pages this process has read."""
    import mmap

    from torch import nn

    from phimm.bench import held_weight_bytes
    from phimm.quant import PackedWeight

    page = mmap.PAGESIZE
    path = tmp_path / "w.bin"
    pages = (8 << 20) // page  # 8 MiB of fp32, a page a row
    n = pages * page // 4
    torch.arange(n, dtype=torch.float32).numpy().tofile(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=n * 4)
    weight = torch.empty(0, dtype=torch.float32).set_(storage).view(pages, n // pages)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.own = nn.Linear(128, 64)  # 128 * 64 * 4 + 64 * 4 bytes of its own
            self.same = [self.own.weight, self.own.weight]  # the same storage again: not counted twice
            self.fmt = PackedWeight(torch.ones(32, 16, dtype=torch.bfloat16), None, lazy=True)  # keeps its source
            self.mapped = weight

    h = Holder()
    own = 128 * 64 * 4 + 64 * 4 + 32 * 16 * 2
    before = held_weight_bytes(h)
    assert before["anonymous"] == own
    assert before["file_mapped"] == n * 4
    assert before["file_resident"] < 4 * page  # nothing of it read yet
    weight[:16].sum()  # the first 16 of its pages
    after = held_weight_bytes(h)
    # the kernel may map more of the page cache around a read fault than was read: fault-around (a 64 KiB window)
    # or, where the file sits in a large folio, that folio (at most 2 MiB)
    assert 16 * page <= after["file_resident"] <= 16 * page + (2 << 20) < n * 4
    assert after["held"] == after["anonymous"] + after["file_resident"]
