#!/usr/bin/env python
"""Load test for the web demo (not a unit test): N concurrent `gradio_client` requests to `/chat`, a mix of text,
image, audio and image+audio, then how many were served, their latencies (p50 / p95 / max) and the errors.

    python scripts/demo_load.py                      # starts the demo on a free 127.0.0.1 port (embedded model,
                                                     # or a tiny random checkpoint if there is none), then stops it
    python scripts/demo_load.py --tiny               # force the tiny random checkpoint
    python scripts/demo_load.py --model PATH         # a checkpoint of your own
    python scripts/demo_load.py --url http://127.0.0.1:7860/   # a demo that is already running (localhost only)

Traffic goes only to localhost and is bounded (--requests, default 20, all sent at once).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "demo" / "examples"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_media(folder: Path) -> dict[str, str]:
    """An image and an audio clip: the bundled examples when present, else made here."""
    media = {}
    index = EXAMPLES / "examples.json"
    if index.is_file():
        for item in json.loads(index.read_text()):
            for key in ("image", "audio"):
                if item.get(key) and key not in media and (EXAMPLES / item[key]).is_file():
                    media[key] = str(EXAMPLES / item[key])
    if "image" not in media:
        from PIL import Image, ImageDraw

        im = Image.new("RGB", (224, 224), "white")
        ImageDraw.Draw(im).ellipse((40, 40, 140, 140), fill="red")
        media["image"] = str(folder / "circle.png")
        im.save(media["image"])
    if "audio" not in media:
        import numpy as np
        import soundfile as sf

        t = np.arange(16000) / 16000
        media["audio"] = str(folder / "tone.wav")
        sf.write(media["audio"], (0.3 * np.sin(2 * np.pi * 220 * t)).astype("float32"), 16000)
    return media


def start_server(args, workdir: Path) -> tuple[subprocess.Popen, str]:
    model = args.model
    embedded = ROOT / "phimm" / "embedded" / "config.json"
    if model is None and (args.tiny or not embedded.is_file()):
        sys.path.insert(0, str(ROOT))
        from phimm.testing import make_tiny_checkpoint

        model = str(make_tiny_checkpoint(workdir / "tiny"))
        print(f"model: tiny random checkpoint ({model})")
    else:
        print(f"model: {model or 'embedded'}")
    port = free_port()
    cmd = [sys.executable, "-m", "demo.app", "--host", "127.0.0.1", "--port", str(port),
           "--max-new-tokens", str(args.max_new_tokens), "--queue-size", str(args.queue_size)]
    if model:
        cmd += ["--model", model]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + args.start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the demo exited with {proc.returncode}; see {workdir / 'server.log'}:\n"
                             + (workdir / "server.log").read_text()[-2000:])
        try:
            with urllib.request.urlopen(url + "config", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the demo did not come up within {args.start_timeout} s")


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running demo to test (localhost only); default: start one")
    p.add_argument("--model", help="checkpoint for the demo this script starts (default: the embedded model)")
    p.add_argument("--tiny", action="store_true", help="start the demo on a tiny random checkpoint")
    p.add_argument("--requests", type=int, default=20, help="requests, all sent at once (default: 20, max 200)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length for the started demo")
    p.add_argument("--queue-size", type=int, default=32, help="queue size for the started demo")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for all answers")
    p.add_argument("--start-timeout", type=float, default=180, help="seconds to wait for the demo to start")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 200:
        p.error("--requests must be in 1..200")
    if args.url and (urlparse(args.url).hostname or "") not in LOCAL_HOSTS:
        p.error("--url must point at this machine (127.0.0.1 / localhost)")

    from gradio_client import Client, handle_file

    with tempfile.TemporaryDirectory(prefix="phimm-demo-load-") as tmp:
        workdir = Path(tmp)
        media = make_media(workdir)
        proc = None
        if args.url:
            url = args.url
        else:
            proc, url = start_server(args, workdir)
        try:
            print(f"demo: {url}")
            kinds = {
                "text": lambda: ("the star is red . what color is the star ?", None, None),
                "image": lambda: ("what color is the circle", handle_file(media["image"]), None),
                "audio": lambda: ("Transcribe the audio clip into text.", None, handle_file(media["audio"])),
                "image+audio": lambda: ("Answer the spoken question about the image.", handle_file(media["image"]),
                                        handle_file(media["audio"])),
            }
            order = list(kinds)
            jobs = [order[i % len(order)] for i in range(args.requests)]
            gate = threading.Barrier(len(jobs))

            def one(kind: str):
                client = Client(url, verbose=False)  # one client per simulated user
                gate.wait(timeout=120)  # everyone sends at the same moment
                t0 = time.perf_counter()
                try:
                    answer, route = client.predict(*kinds[kind](), api_name="/chat")
                    return kind, time.perf_counter() - t0, route, None, t0, time.perf_counter()
                except Exception as e:  # noqa: BLE001
                    return kind, time.perf_counter() - t0, None, f"{type(e).__name__}: {e}", t0, time.perf_counter()

            with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                futures = [pool.submit(one, k) for k in jobs]
                results = [f.result(timeout=args.timeout) for f in futures]
            wall = max(r[5] for r in results) - min(r[4] for r in results)  # first send to last answer
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()

    ok = [r for r in results if r[3] is None]
    errors = [r for r in results if r[3] is not None]
    lat = [r[1] for r in ok]
    print(f"requests: {len(results)} sent at once ({', '.join(f'{jobs.count(k)} {k}' for k in order)})")
    print(f"served:   {len(ok)}/{len(results)}   errors: {len(errors)}")
    if lat:
        print(f"latency:  p50 {percentile(lat, 0.5):.2f} s   p95 {percentile(lat, 0.95):.2f} s   "
              f"max {max(lat):.2f} s   min {min(lat):.2f} s")
    print(f"wall:     {wall:.2f} s   throughput {len(ok) / wall:.2f} req/s")
    routes: dict[str, dict[str, int]] = {}
    for kind, _, route, *_ in ok:
        routes.setdefault(kind, {}).setdefault(route, 0)
        routes[kind][route] += 1
    print("routes:   " + "; ".join(f"{k} -> {routes[k]}" for k in order if k in routes))
    for kind, t, _, err, *_ in errors[:10]:
        print(f"error ({kind}, {t:.2f} s): {err[:300]}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
