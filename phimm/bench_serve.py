"""`phimm bench serve`: continuous batching against one-at-a-time serving and static batching, in one run, on
the same model and the same requests.

    phimm bench serve --clients 16 --json out.json --markdown out.md

Three modes, each driven by `--clients` concurrent client threads (staggered starts; each client sends its
requests one after another, rotating through the four routes text / image / audio / image + audio, so every
route is in flight at once):

- continuous:    `phimm serve` in a subprocess on a free 127.0.0.1 port, streamed chat completions;
- one_at_a_time: the same server with `--max-running 1` (each request decoded alone, as the old demo did);
- static:        the model in this process; a batcher thread takes whatever requests are waiting (up to
                 `--clients`), runs `pipe(batch)` (which returns when the whole batch is done) and only then takes
                 the next batch.

Greedy decoding. Answers vary in length, as real ones do: request i generates exactly `n_i` tokens, one of
`--max-tokens` x (1/4, 1/2, 3/4, 1) drawn with a fixed seed (`min_tokens` = `max_tokens` = `n_i`), the same `n_i` in
every mode, so throughputs compare (`--fixed-length`: every request `--max-tokens`). Per request: start, time to
first token (the first streamed content chunk; in static mode the engine's first-token time inside the batch,
counted from the request's arrival), token times, end, text, route. The clients speak HTTP through `StreamClient`
(`http.client`, a kept connection each): on a 2-core machine whatever CPU they spend is taken from the server.
`rows_match` says whether every continuous answer equals the same request's answer when it ran alone
(one_at_a_time). Not a test: figures depend on the machine; ratios are what to compare.

    phimm bench serve --ray --replicas 2 [--threads 1]

Scale-out instead (`pip install 'phimm[ray]'`), two modes on the same requests: `ray`, `phimm serve --ray` with
`--replicas` replicas of `--threads` torch threads each (default 1), against `continuous`, one `phimm serve`
process with as many threads as all the replicas together (2 x 1 = 2 by default: the same cores). `rows_match`
then says whether every answer of the replicas equals the one process's.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("text", "image", "audio", "image+audio")
SERVE_SIZES = ("embedded", "209m")
DEFAULT_MAX_TOKENS = {"embedded": 16, "209m": 32}
DEFAULT_DTYPE = {"embedded": "float32", "209m": "bfloat16"}
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "demo" / "examples"
MODES = ("continuous", "one_at_a_time", "static")
RAY_MODES = ("continuous", "ray")
MODE_TITLES = {"continuous": "continuous batching (`phimm serve`)",
               "one_at_a_time": "one at a time (`phimm serve --max-running 1`)",
               "static": "static batches (`pipe([...])` in process)",
               "ray": "Ray Serve replicas (`phimm serve --ray`)"}


# ------------------------------------------------------------------------------------------------ requests


@dataclass
class Item:
    """One benchmark request: the same prompt and media go to the server (as an OpenAI body) and to `pipe`."""

    index: int
    client: int
    kind: str
    text: str
    image: bytes | None = None  # PNG bytes
    audio: bytes | None = None  # WAV bytes
    tokens: int = 16  # exactly this many new tokens, in every mode

    def chat_body(self, max_tokens: int, min_tokens: int | None = None) -> bytes:
        parts: list[dict] = []
        if self.image is not None:
            parts.append({"type": "image_url",
                          "image_url": {"url": "data:image/png;base64," + base64.b64encode(self.image).decode()}})
        if self.audio is not None:
            parts.append({"type": "input_audio",
                          "input_audio": {"data": base64.b64encode(self.audio).decode(), "format": "wav"}})
        parts.append({"type": "text", "text": self.text})
        body = {"messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        if min_tokens:
            body["min_tokens"] = min_tokens
        return json.dumps(body).encode()

    def request(self):
        """The same request as `chat_body` becomes on the server (`parse_chat`): images, audio, then the text."""
        import phimm

        parts: list[dict] = []
        if self.image is not None:
            parts.append({"type": "image", "image": self.image})
        if self.audio is not None:
            parts.append({"type": "audio", "audio": self.audio})
        parts.append({"type": "text", "text": self.text})
        return phimm.Request(messages=[{"role": "user", "content": parts}])


def media_pool(size: str, seed: int = 0) -> dict[str, list[tuple[str, bytes | None, bytes | None]]]:
    """Per route, a list of (prompt, PNG bytes, WAV bytes): the demo's examples for the embedded model, media
    made like `phimm bench`'s workload for 209m."""
    pool: dict[str, list] = {k: [] for k in KINDS}
    if size == "embedded":
        from .toy.examples import read_examples

        for text, image, audio in read_examples(EXAMPLES_DIR):
            kind = "image+audio" if image and audio else "image" if image else "audio" if audio else "text"
            pool[kind].append((text, image, audio))
    else:
        import soundfile as sf

        from .bench import SIZES, workload

        prompts = {"text": "what color is the circle number {i}", "image": "what shape is the red one",
                   "audio": "Transcribe the audio clip into text.",
                   "image+audio": "Answer the spoken question about the image."}
        for i, (kind, _, images, audios) in enumerate(workload(SIZES[size], seed)):
            png = wav = None
            if images:
                buf = io.BytesIO()
                images[0].save(buf, format="PNG")
                png = buf.getvalue()
            if audios:
                buf = io.BytesIO()
                arr, rate = audios[0]
                sf.write(buf, arr, rate, format="WAV", subtype="PCM_16")
                wav = buf.getvalue()
            pool[kind].append((prompts[kind].format(i=i // len(KINDS)), png, wav))
    missing = [k for k in KINDS if not pool[k]]
    if missing:
        raise RuntimeError(f"no example requests for the route(s) {missing}")
    return pool


def make_items(size: str, clients: int, per_client: int, seed: int = 0, max_tokens: int = 16,
               fixed_length: bool = False, unique_media: bool = False) -> list[list[Item]]:
    """`per_client` requests for each of `clients` clients; client c's j-th request takes route (c + j) mod 4,
    so every route is in flight at once; within a route the examples are used in turn. Each request's length is
    `max_tokens` x one of (1/4, 1/2, 3/4, 1), drawn with `seed` (or `max_tokens` for all, `fixed_length`).
    `unique_media`: every request's image and clip made distinct (`distinct_media`), so that no cache of processed
    media or encoder features serves a repeat; otherwise the few examples recur, as a conversation's media do."""
    import random

    rng = random.Random(f"bench-serve:{seed}")
    pool = media_pool(size, seed)
    used = {k: 0 for k in KINDS}
    out: list[list[Item]] = []
    index = 0
    for c in range(clients):
        mine = []
        for j in range(per_client):
            kind = KINDS[(c + j) % len(KINDS)]
            text, image, audio = pool[kind][used[kind] % len(pool[kind])]
            used[kind] += 1
            if unique_media:
                image, audio = distinct_media(image, audio, index)
            n = max_tokens if fixed_length else max(1, round(max_tokens * rng.choice((0.25, 0.5, 0.75, 1.0))))
            mine.append(Item(index, c, kind, text, image, audio, n))
            index += 1
        out.append(mine)
    return out


def distinct_media(png: bytes | None, wav: bytes | None, index: int) -> tuple[bytes | None, bytes | None]:
    """The same image and clip, changed just enough to be other files: one pixel's colour (PNG) and one
    sample's value (16-bit WAV) set from `index`."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    if png is not None:
        img = Image.open(io.BytesIO(png)).convert("RGB")
        img.putpixel((0, 0), (index % 256, (index // 256) % 256, 7))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        png = buf.getvalue()
    if wav is not None:
        data, rate = sf.read(io.BytesIO(wav), dtype="int16")
        data = np.array(data, copy=True)
        data.reshape(-1)[0] = np.int16(index % 30000)
        buf = io.BytesIO()
        sf.write(buf, data, rate, format="WAV", subtype="PCM_16")
        wav = buf.getvalue()
    return png, wav


def visible_checkpoint(ckpt: Path) -> Path:
    """`ckpt` with a tokenizer that gives every id of the model's vocabulary some text (`{ckpt}-visible/`: the
    same files, linked, but tokenizer.json). A random-weight bench checkpoint has a 32000-id vocabulary and the toy
    tokenizer's 400 tokens, so nearly every generated token would decode to nothing: a server streams no chunk for
    it (no time to first token, no token times) and every answer is the empty string. The ids the tokenizer lacks
    become plain vocabulary entries (" v<id>") without merges: prompts tokenize exactly as before, the weights are
    the same, and each generated token streams a piece of text, as with a real tokenizer."""
    out = ckpt.parent / f"{ckpt.name}-visible"
    if (out / "tokenizer.json").is_file() and (out / "config.json").exists():
        return out
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    vocab_size = int(json.loads((ckpt / "config.json").read_text())["vocab_size"])
    vocab = tok["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in tok.get("added_tokens", ())}
    for i in range(vocab_size):
        if i not in used:
            vocab[f"\u0120v{i}"] = i  # "Ġ" is the byte-level alphabet's space
    out.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.name != "tokenizer.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    tmp = out / "tokenizer.json.tmp"
    tmp.write_text(json.dumps(tok, ensure_ascii=False))
    tmp.replace(out / "tokenizer.json")
    return out


# ------------------------------------------------------------------------------------------------ records


@dataclass
class Record:
    """What one request did, in absolute `time.perf_counter()` seconds."""

    index: int
    client: int
    kind: str
    start: float = 0.0
    first: float | None = None  # first token (first content chunk)
    token_times: list[float] = field(default_factory=list)
    end: float | None = None
    text: str = ""
    route: str | None = None
    tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None


def _percentile(values, q: float) -> float | None:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def summarize(records: list[Record], lengths: dict[int, int]) -> dict:
    ok = [r for r in records if r.ok]
    starts = [r.start for r in records]
    ends = [r.end for r in records if r.end is not None]
    wall = (max(ends) - min(starts)) if ends and starts else 0.0
    tokens = sum(r.tokens for r in ok)
    ttft = [r.first - r.start for r in ok if r.first is not None]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    latency = [r.end - r.start for r in ok]
    return {
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_s": _percentile(ttft, 50), "ttft_p95_s": _percentile(ttft, 95),
        "itl_p50_s": _percentile(itl, 50), "itl_p95_s": _percentile(itl, 95),
        "latency_p50_s": _percentile(latency, 50), "latency_p95_s": _percentile(latency, 95),
        "wall_s": wall, "requests": len(ok), "errors": len(records) - len(ok), "tokens": tokens,
        "every_request_its_length": bool(ok) and all(r.tokens == lengths[r.index] for r in ok),
    }


def run_clients(items_by_client: list[list[Item]], sender, stagger_s: float) -> list[Record]:
    """One thread per client: client c starts `c * stagger_s` s after the first and sends its requests one after
    another. `sender()` is a context manager giving that client's `send(item) -> Record`."""
    records: dict[int, Record] = {}
    lock = threading.Lock()
    t0 = time.perf_counter()

    def client(c: int, items: list[Item]) -> None:
        time.sleep(max(0.0, t0 + c * stagger_s - time.perf_counter()))
        try:
            with sender() as send:
                for item in items:
                    try:
                        rec = send(item)
                    except Exception as e:  # noqa: BLE001 - recorded, reported, the run goes on
                        rec = Record(item.index, item.client, item.kind, start=time.perf_counter(),
                                     error=f"{type(e).__name__}: {e}")
                    with lock:
                        records[item.index] = rec
        except Exception as e:  # noqa: BLE001 - the client could not even start
            with lock:
                for item in items:
                    records.setdefault(item.index, Record(item.index, item.client, item.kind, start=t0,
                                                          error=f"{type(e).__name__}: {e}"))

    threads = [threading.Thread(target=client, args=(c, items), name=f"bench-client-{c}", daemon=True)
               for c, items in enumerate(items_by_client)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)
    return [records[i.index] for items in items_by_client for i in items]


# ------------------------------------------------------------------------------------------------ server modes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux): SIGTERM when we die
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_process(proc: subprocess.Popen | None, grace_s: float = 15.0) -> None:
    """Terminate, then kill if it does not exit in `grace_s`."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _tail(path: Path, n: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_bytes()[-n:].decode(errors="replace")
    return ""


@contextlib.contextmanager
def server_process(cmd: list[str], url: str, log_path: Path, startup_timeout_s: float, grace_s: float = 15.0):
    """Start `phimm serve`, wait until /health answers 200, yield; always stop it afterwards (SIGTERM, then a
    kill after `grace_s`)."""
    import httpx

    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = None
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            deadline = time.monotonic() + startup_timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready; "
                                       f"its log ({log_path}):\n{_tail(log_path)}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=2.0, trust_env=False).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the server was not ready after {startup_timeout_s:.0f} s; its log "
                                       f"({log_path}):\n{_tail(log_path)}")
                time.sleep(0.2)
            yield proc
        finally:
            stop_process(proc, grace_s)


class StreamClient:
    """The clients' HTTP: one keep-alive HTTP/1.1 connection per thread (`http.client`, no pool, no proxy lookup)
    reading a streamed answer line by line. The clients share the 2-core machine with the server, so what they
    spend per request is taken from it: this costs about a quarter of the CPU an `httpx.Client` does."""

    def __init__(self, url: str, timeout_s: float):
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port, self.timeout_s = parts.hostname, parts.port or 80, timeout_s
        self._local = threading.local()

    def _connection(self):
        import http.client

        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextlib.contextmanager
    def post_stream(self, path: str, body: bytes):
        """POST `body` (JSON) and yield (status, response); the connection is kept for the next request only when
        the answer was read to its end."""
        import http.client

        reused = getattr(self._local, "conn", None) is not None
        conn = self._connection()
        try:
            conn.request("POST", path, body=body, headers={"content-type": "application/json"})
            resp = conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            self.close()
            if not reused:
                raise
            conn = self._connection()  # the server had closed the idle connection: once more on a new one
            conn.request("POST", path, body=body, headers={"content-type": "application/json"})
            resp = conn.getresponse()
        except Exception:
            self.close()
            raise
        try:
            yield resp.status, resp
        finally:
            if not resp.isclosed():
                self.close()


def send_streamed(http: StreamClient, url: str, item: Item, body: bytes, timeout_s: float) -> Record:
    """POST one streamed chat completion; the time of every content chunk is a token time."""
    rec = Record(item.index, item.client, item.kind, start=time.perf_counter())
    deadline = rec.start + timeout_s
    pieces: list[str] = []
    with http.post_stream("/v1/chat/completions", body) as (status, resp):
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {resp.read()[:300].decode('utf-8', 'replace')}")
        while True:
            line = resp.readline()
            if not line:
                break
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"the request took longer than {timeout_s:.0f} s")
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                resp.read()  # the end of the chunked body, so that the connection can be reused
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error'].get('message')}")
            if chunk.get("route") is not None:
                rec.route = chunk["route"]
            if chunk.get("usage"):
                rec.tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    rec.first = rec.first or now
                    rec.token_times.append(now)
                    pieces.append(content)
    rec.end = time.perf_counter()
    rec.text = "".join(pieces)
    return rec


def run_server_mode(args, items_by_client, bodies: dict[int, bytes], max_running: int, model: str | None,
                    dtype: str, log_path: Path, threads: int | None = None,
                    extra: tuple[str, ...] = ()) -> tuple[list[Record], list[str]]:
    """`phimm serve [extra]` with `threads` torch threads (default: --threads), driven by the clients."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "phimm.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-running", str(max_running), "--dtype", dtype, "--log-level", "warning", *extra]
    if model is not None:
        cmd += ["--model", str(model)]
    threads = args.threads if threads is None else threads
    if threads is not None:
        cmd += ["--threads", str(threads)]
    @contextlib.contextmanager
    def sender():
        http = StreamClient(url, args.request_timeout)
        try:
            yield lambda item: send_streamed(http, url, item, bodies[item.index], args.request_timeout)
        finally:
            http.close()

    with server_process(cmd, url, log_path, args.startup_timeout, grace_s=60.0 if "--ray" in extra else 15.0):
        # warm-up (not timed): one short request per route, so lazy set-up is not in the measurement; with Ray,
        # rounds of all routes at once, which Ray spreads over the replicas, so that every replica is warm
        http = StreamClient(url, args.request_timeout)  # a connection per thread
        try:
            if "--ray" in extra:
                replicas = int(extra[extra.index("--replicas") + 1]) if "--replicas" in extra else 1
                for _ in range(2 * replicas):
                    warm = [threading.Thread(target=send_streamed, args=(http, url, item, item.chat_body(2),
                                                                         args.request_timeout))
                            for item in _one_per_kind(items_by_client)]
                    for t in warm:
                        t.start()
                    for t in warm:
                        t.join()
            else:
                for item in _one_per_kind(items_by_client):
                    send_streamed(http, url, item, item.chat_body(2), args.request_timeout)
        finally:
            http.close()  # this thread's; the warm-up threads' close with them
        records = run_clients(items_by_client, sender, args.stagger_s)
    return records, cmd


def _one_per_kind(items_by_client: list[list[Item]]) -> list[Item]:
    seen: dict[str, Item] = {}
    for items in items_by_client:
        for item in items:
            seen.setdefault(item.kind, item)
    return list(seen.values())


# ------------------------------------------------------------------------------------------------ static mode


class StaticBatcher:
    """Static batching over `pipe`: take whatever is waiting (up to `max_batch`), run `pipe(batch)` to the end of
    its longest row, answer them all, then take the next batch."""

    def __init__(self, pipe, max_batch: int, **generation):
        self.pipe = pipe
        self.max_batch = max_batch
        self.generation = generation
        self.batch_sizes: list[int] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="bench-static-batcher", daemon=True)
        self._thread.start()

    def submit(self, request, tokens: int) -> Future:
        fut: Future = Future()
        self._queue.put(((request, tokens), fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def run_batch(self, batch):
        """`pipe([...])` with each row's own length: the rows are queued together and the batch returns when its
        longest row is done (rows that finish earlier free their compute: kinder than classic static batching,
        whose finished rows decode padding)."""
        from .generation import GenerationOptions

        items = []
        for request, tokens in batch:
            prepared, route = self.pipe.prepare(request)
            opts = GenerationOptions.from_kwargs(self.pipe.generation, max_new_tokens=tokens, min_new_tokens=tokens,
                                                 **self.generation)
            items.append((prepared, route, opts))
        return [s.result() for s in self.pipe.engine.submit_many(items, events=False)]

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            t_call = time.perf_counter()
            try:
                outs = self.run_batch([r for r, _ in batch])
            except BaseException as e:  # noqa: BLE001 - handed to the waiting clients
                for _, fut in batch:
                    fut.set_exception(e)
                continue
            t_done = time.perf_counter()
            self.batch_sizes.append(len(batch))
            for (_, fut), out in zip(batch, outs):
                fut.set_result((out, t_call, t_done))


def run_static_mode(args, items_by_client, max_tokens: int, model: str | None, dtype: str,
                    max_batch: int) -> tuple[list[Record], list[int]]:
    import phimm
    from phimm.engine import EngineLimits

    pipe = phimm.load(model, dtype=dtype, threads=args.threads,
                      limits=EngineLimits(max_running=max(16, max_batch)))
    requests = {i.index: i.request() for items in items_by_client for i in items}
    try:
        pipe([i.request() for i in _one_per_kind(items_by_client)], max_new_tokens=2, do_sample=False)  # warm-up
        batcher = StaticBatcher(pipe, max_batch, do_sample=False)
        try:
            @contextlib.contextmanager
            def sender():
                yield lambda item: _send_static(batcher, item, requests[item.index], args.request_timeout)

            records = run_clients(items_by_client, sender, args.stagger_s)
        finally:
            batcher.close()
        return records, batcher.batch_sizes
    finally:
        pipe.close()


def _send_static(batcher: StaticBatcher, item: Item, request, timeout_s: float) -> Record:
    rec = Record(item.index, item.client, item.kind, start=time.perf_counter())
    out, t_call, _ = batcher.submit(request, item.tokens).result(timeout=timeout_s)
    rec.end = time.perf_counter()  # the answer comes back only when the whole batch is done
    if out.error is not None:
        raise out.error
    rec.text, rec.route, rec.tokens = out.text, str(out.route), len(out.token_ids)
    if out.ttft_s is not None:
        # the engine's first-token time inside the batch; the rows of a static batch decode in lockstep, so
        # its tokens are spread evenly over the decode time
        rec.first = t_call + out.ttft_s
        n = max(len(out.token_ids), 1)
        step = (out.decode_s or 0.0) / (n - 1) if n > 1 else 0.0
        rec.token_times = [rec.first + k * step for k in range(n)]
    return rec


# ------------------------------------------------------------------------------------------------ the run


def run(args) -> dict:
    size = args.size
    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS[size]
    dtype = args.dtype or DEFAULT_DTYPE[size]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = None
    if size != "embedded":
        from .bench import make_checkpoint

        model = str(visible_checkpoint(make_checkpoint(size, workdir)))
    items_by_client = make_items(size, args.clients, args.requests_per_client, args.seed, max_tokens,
                                 args.fixed_length, args.unique_media)
    n_requests = args.clients * args.requests_per_client
    bodies = {i.index: i.chat_body(i.tokens, i.tokens) for items in items_by_client for i in items}
    lengths = {i.index: i.tokens for items in items_by_client for i in items}
    max_batch = args.clients
    if getattr(args, "ray", False):
        return run_ray(args, items_by_client, bodies, lengths, size, model, dtype, max_tokens, max_batch)
    from .pipeline import default_threads

    threads = args.threads or default_threads()  # what the servers and phimm.load use when --threads is not given
    print(f"[bench serve] size={size} dtype={dtype} clients={args.clients} requests={n_requests} "
          f"max_tokens={max_tokens} threads={threads}", flush=True)
    results: dict = {
        "clients": args.clients, "requests_per_client": args.requests_per_client, "requests": n_requests,
        "size": size, "model": model or "embedded", "dtype": dtype, "threads": threads,
        "max_tokens": max_tokens, "fixed_length": bool(args.fixed_length),
        "unique_media": bool(args.unique_media),
        "request_tokens": sorted(lengths.values()), "stagger_s": args.stagger_s,
        "itl_note": "server modes: gaps between streamed content chunks; static: each row's decode time over its "
                    "tokens (rows of a static batch decode in lockstep)",
    }
    records: dict[str, list[Record]] = {}
    for mode, max_running in (("continuous", max(1, max_batch)), ("one_at_a_time", 1)):
        t = time.perf_counter()
        records[mode], cmd = run_server_mode(args, items_by_client, bodies, max_running, model, dtype,
                                             workdir / f"bench-serve-{mode}.log")
        results[mode] = summarize(records[mode], lengths)
        results[mode]["server_command"] = " ".join(cmd[3:])
        _progress(mode, results[mode], time.perf_counter() - t)
        _save_partial(args, results)
    t = time.perf_counter()
    records["static"], batch_sizes = run_static_mode(args, items_by_client, max_tokens, model, dtype, max_batch)
    results["static"] = summarize(records["static"], lengths)
    results["static"]["batch_sizes"] = batch_sizes
    _progress("static", results["static"], time.perf_counter() - t)

    def ratio(a: str, b: str):
        x, y = results[a]["requests_per_s"], results[b]["requests_per_s"]
        return x / y if y else None

    results["speedup_vs_one_at_a_time"] = ratio("continuous", "one_at_a_time")
    results["speedup_vs_static"] = ratio("continuous", "static")
    alone = {r.index: r for r in records["one_at_a_time"]}
    match = sum(int(r.ok and alone[r.index].ok and r.text == alone[r.index].text) for r in records["continuous"])
    static_match = sum(int(r.ok and alone[r.index].ok and r.text == alone[r.index].text) for r in records["static"])
    results["rows_match"] = match == n_requests
    results["rows_matching"] = f"{match}/{n_requests}"
    results["static_rows_matching"] = f"{static_match}/{n_requests}"
    results["per_request"] = [_detail(records, i) for items in items_by_client for i in items]
    return results


def run_ray(args, items_by_client, bodies, lengths, size, model, dtype, max_tokens, max_batch) -> dict:
    """`phimm serve --ray --replicas N --threads T` against one `phimm serve --threads N*T`: the same cores, the
    same requests."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise SystemExit("phimm bench serve --ray needs Ray Serve: pip install 'phimm[ray]'")
    n_requests = args.clients * args.requests_per_client
    per_replica = args.threads or 1
    total = per_replica * args.replicas
    print(f"[bench serve] size={size} dtype={dtype} clients={args.clients} requests={n_requests} "
          f"max_tokens={max_tokens}: {args.replicas} Ray replica(s) x {per_replica} thread(s) vs 1 process x "
          f"{total} thread(s)", flush=True)
    results: dict = {
        "clients": args.clients, "requests_per_client": args.requests_per_client, "requests": n_requests,
        "size": size, "model": model or "embedded", "dtype": dtype, "threads": total,
        "replicas": args.replicas, "threads_per_replica": per_replica, "modes": list(RAY_MODES),
        "mode_titles": {"continuous": f"1 process x {total} thread(s) (`phimm serve --threads {total}`)",
                        "ray": f"{args.replicas} Ray replicas x {per_replica} thread(s) (`phimm serve --ray "
                               f"--replicas {args.replicas} --threads {per_replica}`)"},
        "max_tokens": max_tokens, "fixed_length": bool(args.fixed_length),
        "unique_media": bool(args.unique_media),
        "request_tokens": sorted(lengths.values()), "stagger_s": args.stagger_s,
        "itl_note": "gaps between streamed content chunks",
    }
    records: dict[str, list[Record]] = {}
    for mode, threads, extra in (("continuous", total, ()),
                                 ("ray", per_replica, ("--ray", "--replicas", str(args.replicas)))):
        t = time.perf_counter()
        records[mode], cmd = run_server_mode(args, items_by_client, bodies, max(1, max_batch), model, dtype,
                                             Path(args.workdir) / f"bench-serve-{mode}.log", threads, extra)
        results[mode] = summarize(records[mode], lengths)
        results[mode]["server_command"] = " ".join(cmd[3:])
        _progress(mode, results[mode], time.perf_counter() - t)
        _save_partial(args, results)
    x, y = results["ray"]["requests_per_s"], results["continuous"]["requests_per_s"]
    results["speedup_ray_vs_one_process"] = x / y if y else None
    one = {r.index: r for r in records["continuous"]}
    match = sum(int(r.ok and one[r.index].ok and r.text == one[r.index].text) for r in records["ray"])
    results["rows_match"] = match == n_requests
    results["rows_matching"] = f"{match}/{n_requests}"
    results["per_request"] = [_detail(records, i) for items in items_by_client for i in items]
    return results


def _save_partial(args, results: dict) -> None:
    """Keep what is measured so far, should a later mode fail (the full report replaces it)."""
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _progress(mode: str, s: dict, took: float) -> None:
    print(f"[bench serve] {mode}: {s['requests']} requests ({s['errors']} errors) in {s['wall_s']:.2f} s, "
          f"{s['requests_per_s']:.2f} req/s, {s['tokens_per_s']:.1f} tok/s (mode took {took:.1f} s)", flush=True)


def _detail(records: dict[str, list[Record]], item: Item) -> dict:
    d: dict = {"index": item.index, "client": item.client, "kind": item.kind, "prompt": item.text}
    for mode, recs in records.items():
        r = next(x for x in recs if x.index == item.index)
        t0 = r.start
        d[mode] = {"text": r.text, "route": r.route, "tokens": r.tokens, "error": r.error,
                   "start_s": r.start, "ttft_s": (r.first - t0) if r.first is not None else None,
                   "end_s": (r.end - t0) if r.end is not None else None,
                   "token_times_s": [round(x - t0, 6) for x in r.token_times]}
    return d


def _fmt(x, unit: str = "", digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}{unit}"


def markdown(results: dict, command: str) -> str:
    modes = results.get("modes", MODES)
    titles = {**MODE_TITLES, **results.get("mode_titles", {})}
    lines = [
        f"Command: `{command}`",
        "",
        f"Model: {results['model']} ({results['dtype']}, {results['threads']} torch thread(s)"
        + (f" in all: {results['replicas']} replicas x {results['threads_per_replica']}" if "replicas" in results
           else "") + "), "
        f"{results['clients']} concurrent clients x "
        f"{results['requests_per_client']} requests = {results['requests']} mixed requests (text / image / audio / "
        f"image + audio), greedy, "
        + (f"exactly {results['max_tokens']} new tokens each." if results.get("fixed_length") else
           f"each exactly its own length of {min(results['request_tokens'])}-{max(results['request_tokens'])} new "
           f"tokens ({sum(results['request_tokens'])} in all), the same in every mode."),
        "",
        "| mode | requests/s | tokens/s | TTFT p50 | TTFT p95 | ITL p50 | wall | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in modes:
        s = results[mode]
        lines.append(f"| {titles[mode]} | {s['requests_per_s']:.2f} | {s['tokens_per_s']:.1f} | "
                     f"{_fmt(s['ttft_p50_s'], ' s')} | {_fmt(s['ttft_p95_s'], ' s')} | "
                     f"{_fmt(None if s['itl_p50_s'] is None else s['itl_p50_s'] * 1000, ' ms', 1)} | "
                     f"{s['wall_s']:.2f} s | {s['errors']} |")
    if "replicas" in results:
        speedup = _fmt(results["speedup_ray_vs_one_process"], "x", 2)
        lines += ["", f"Ray Serve, {results['replicas']} replicas: {speedup} the requests/s of one process with as "
                      f"many threads. Answers equal to the one process's: {results['rows_matching']}."]
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"Continuous batching: {_fmt(results['speedup_vs_one_at_a_time'], 'x', 2)} the requests/s of one at a time, "
        f"{_fmt(results['speedup_vs_static'], 'x', 2)} those of static batches. Answers equal to the same request "
        f"run alone: {results['rows_matching']} (continuous), {results['static_rows_matching']} (static).",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    p.add_argument("--requests-per-client", type=int, default=16,
                   help="requests each client sends (default: 16; with 4, 16 clients' continuous run lasts about 0.4 "
                        "s on the embedded model, so the clients' staggered start and their tail weigh as much as "
                        "the steady state)")
    p.add_argument("--size", default="embedded", choices=SERVE_SIZES,
                   help="the embedded model, or a random-weight 209M checkpoint (default: embedded)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="new tokens per request, exactly (default: 16 embedded, 32 for 209m)")
    p.add_argument("--fixed-length", action="store_true",
                   help="every request generates --max-tokens tokens (default: lengths vary, 1/4 to 1 of it)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 for embedded, bfloat16 for 209m")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the server and the static mode (default: PHIMM_THREADS or one per two cores)")
    p.add_argument("--unique-media", action="store_true",
                   help="every request's image and clip distinct (no processed-media or feature cache hits); by "
                        "default the demo's few examples recur, as a conversation's media do")
    p.add_argument("--stagger-s", type=float, default=0.01, help="client c starts c * this many seconds late")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds any one HTTP request may take")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds the server may take to load")
    p.add_argument("--seed", type=int, default=0, help="seed of the 209m media")
    p.add_argument("--workdir", default="runs", help="random checkpoints (reused) and the servers' logs")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the Markdown table here")
    p.add_argument("--ray", action="store_true",
                   help="scale-out instead: `phimm serve --ray` with --replicas replicas of --threads threads (default "
                        "1) against one `phimm serve` with all their threads (needs pip install 'phimm[ray]')")
    p.add_argument("--replicas", type=int, default=2, help="with --ray: Ray Serve replicas (default: 2)")


def _command_line() -> str:
    argv = sys.argv[1:]
    if argv[:2] == ["bench", "serve"]:
        return "phimm " + " ".join(argv)
    return "phimm bench serve " + " ".join(a for a in argv if a != "serve")


def cmd_bench_serve(args) -> int:
    for name in ("clients", "requests_per_client", "max_tokens", "replicas"):
        v = getattr(args, name)
        if v is not None and v < 1:
            print(f"phimm bench serve: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM unwinds too, so servers are stopped

        def on_term(signum, frame):
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        results = run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    table = markdown(results, _command_line())
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0 if all(results[m]["errors"] == 0 for m in results.get("modes", MODES)) else 1


def register(modes) -> None:
    """Add `serve` to `phimm bench`'s modes (a subparsers action)."""
    p = modes.add_parser("serve", help="continuous batching vs one at a time vs static batches, over HTTP",
                         description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=cmd_bench_serve)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phimm.bench_serve")
    add_arguments(p)
    return cmd_bench_serve(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
