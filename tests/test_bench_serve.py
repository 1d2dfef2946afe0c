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


def test_stream_client_reads_streams_and_reconnects_after_the_server_closes_an_idle_connection():
    """The bench's clients: a streamed answer read line by line over a kept connection; when the server has closed
    that connection meanwhile, the next request goes on a new one."""
    import http.server
    import threading

    from phimm.bench_serve import Item, StreamClient, send_streamed

    served = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 - the stdlib's name
            self.rfile.read(int(self.headers["content-length"]))
            served.append(self.client_address)
            events = [{"route": "none", "choices": [{"delta": {"content": w}}]} for w in ("a", "b")]
            events.append({"choices": [], "usage": {"completion_tokens": 2}})
            body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for part in (body[:10], body[10:]):
                data = part.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")
            if len(served) == 2:
                self.close_connection = True  # closes it without saying so, as an idle timeout does

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        client = StreamClient(url, 10.0)
        item = Item(index=0, client=0, kind="text", text="hi", tokens=2)
        recs = [send_streamed(client, url, item, b"{}", 10.0) for _ in range(3)]
        client.close()
    finally:
        server.shutdown()
    assert [(r.text, r.route, r.tokens, len(r.token_times)) for r in recs] == [("ab", "none", 2, 2)] * 3
    assert served[0] == served[1] != served[2]  # the first two on one connection, the third on a new one
