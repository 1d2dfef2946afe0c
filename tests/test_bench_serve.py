"""`phimm bench serve` in a tiny configuration on the embedded model: two `phimm serve` subprocesses (continuous,
then --max-running 1) and static batches in process, 4 clients x 2 requests x 3 tokens (with 4 clients every
route is in flight at once). Checks the report's shape, that every mode served every request with exactly
max_tokens tokens on the right route, and that continuous batching answers as each request alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="phimm bench serve needs the serve extra (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="phimm bench serve needs the serve extra (pip install -e '.[serve]')")
pytest.importorskip("httpx", reason="phimm bench serve needs httpx")

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "phimm" / "embedded" / "config.json"
MODE_KEYS = ("requests_per_s", "tokens_per_s", "ttft_p50_s", "ttft_p95_s", "itl_p50_s", "wall_s")


@pytest.mark.skipif(not EMBEDDED.is_file(), reason="needs the embedded model")
def test_bench_serve_tiny(tmp_path):
    out, md = tmp_path / "out.json", tmp_path / "out.md"
    env = dict(os.environ, OMP_NUM_THREADS="1", PHIMM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "phimm.cli", "bench", "serve", "--clients", "4", "--requests-per-client", "2",
           "--max-tokens", "4", "--workdir", str(tmp_path), "--json", str(out), "--markdown", str(md),
           "--startup-timeout", "120", "--request-timeout", "60"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r = json.loads(out.read_text())
    assert (r["clients"], r["requests"], r["size"], r["max_tokens"]) == (4, 8, "embedded", 4)
    lengths = r["request_tokens"]
    assert len(lengths) == 8 and set(lengths) <= {1, 2, 3, 4} and len(set(lengths)) > 1  # answers vary in length
    for mode in ("continuous", "one_at_a_time", "static"):
        s = r[mode]
        assert set(MODE_KEYS) <= set(s), mode
        assert s["requests_per_s"] > 0 and s["tokens_per_s"] > 0 and s["wall_s"] > 0, (mode, s)
        assert s["ttft_p50_s"] > 0 and s["itl_p50_s"] >= 0, (mode, s)
        assert (s["requests"], s["errors"], s["tokens"]) == (8, 0, sum(lengths)), (mode, s)
        assert s["every_request_its_length"], (mode, s)  # each request exactly its own length, in every mode
    assert r["speedup_vs_one_at_a_time"] > 0 and r["speedup_vs_static"] > 0
    assert r["rows_match"] is True and r["rows_matching"] == "8/8"
    first = {p["kind"] for p in r["per_request"] if p["index"] % 2 == 0}  # each client's first request
    assert first == {"text", "image", "audio", "image+audio"}
    for p in r["per_request"]:
        routes = {p[m]["route"] for m in ("continuous", "one_at_a_time", "static")}
        assert len(routes) == 1, p
        route = routes.pop()
        want = {"text": "none", "image": "vision", "audio": "speech", "image+audio": "vision+"}[p["kind"]]
        assert route == want or (want.endswith("+") and route.startswith(want)), p
    assert "| continuous batching" in md.read_text() and "| continuous batching" in proc.stdout


@pytest.mark.skipif(not EMBEDDED.is_file(), reason="needs the embedded model")
def test_unique_media_makes_every_request_s_files_distinct():
    import hashlib
    import io

    import soundfile as sf
    from PIL import Image

    from phimm.bench_serve import make_items

    same = [i for c in make_items("embedded", 4, 4) for i in c]
    unique = [i for c in make_items("embedded", 4, 4, unique_media=True) for i in c]
    assert [(i.kind, i.text, i.tokens) for i in same] == [(i.kind, i.text, i.tokens) for i in unique]

    def digests(items, attr):
        return [hashlib.blake2b(getattr(i, attr)).hexdigest() for i in items if getattr(i, attr)]

    for attr in ("image", "audio"):
        assert len(set(digests(same, attr))) < len(digests(same, attr))  # the examples recur
        assert len(set(digests(unique, attr))) == len(digests(unique, attr))  # every file its own
    for a, b in zip(same, unique):
        if a.image:
            x, y = Image.open(io.BytesIO(a.image)).convert("RGB"), Image.open(io.BytesIO(b.image)).convert("RGB")
            assert x.size == y.size and sum(p != q for p, q in zip(x.getdata(), y.getdata())) <= 1
        if a.audio:
            x, rx = sf.read(io.BytesIO(a.audio), dtype="int16")
            y, ry = sf.read(io.BytesIO(b.audio), dtype="int16")
            assert rx == ry and x.shape == y.shape and (x != y).sum() <= 1
