"""`phimm serve`, tested as users reach it: the server runs as a subprocess on a free loopback port, and the
official `openai` client (or plain HTTP for what the client cannot send) talks to it. The answers are checked
against the same requests run in this process on the same (embedded) model."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

import phimm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "demo" / "examples"
KEY = "test-key"
MAX_TOKENS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`phimm serve` in a subprocess; stopped (terminate, then kill) by `stop()`."""

    def __init__(self, *args: str, tmp: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PHIMM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = open(tmp / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "phimm.cli", "serve", "--port", str(self.port), *args],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {(tmp / f'server-{self.port}.log').read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not become ready in 120 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self.log.close()

    def client(self, key: str | None = KEY, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", timeout=60, max_retries=0, **kw)

    def post(self, path: str, key: str | None = KEY, headers: dict | None = None, **kw) -> httpx.Response:
        headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
        return httpx.post(self.url + path, headers=headers, timeout=60, **kw)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "circle.png").write_bytes((EXAMPLES / "red_circle_blue_star.png").read_bytes())
    return d


@pytest.fixture(scope="module")
def server(tmp_path_factory, media_dir):
    s = Server("--api-key", KEY, "--allowed-media-dir", str(media_dir), "--max-body-mb", "1",
               tmp=tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model_name(server):
    return server.client().models.list().data[0].id


@pytest.fixture(scope="module")
def local():
    pipe = phimm.load(threads=1)
    yield pipe
    pipe.close()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def image_part(name="red_circle_blue_star.png"):
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(EXAMPLES / name)}"}}


def audio_part(name):
    return {"type": "input_audio", "input_audio": {"data": b64(EXAMPLES / name), "format": "wav"}}


def text_part(text):
    return {"type": "text", "text": text}


# route -> (content parts, what the embedded model answers)
CASES = {
    "none": ([text_part("the star is red . what color is the star ?")], "red"),
    "vision": ([image_part(), text_part("what color is the circle")], "red"),
    "speech": ([audio_part("digits_four_seven_one_nine.wav"), text_part("Transcribe the audio clip into text.")],
               "four seven one nine"),
    "vision+vision_speech": ([image_part(), audio_part("question_what_color_is_the_circle.wav"),
                              text_part("Answer the spoken question about the image.")], "red"),
}


def local_request(parts) -> phimm.Request:
    """The request the server builds from these parts, built here from the same bytes."""
    out = []
    for p in parts:
        if p["type"] == "text":
            out.append(p)
        elif p["type"] == "image_url":
            out.append({"type": "image", "image": base64.b64decode(p["image_url"]["url"].split(",", 1)[1])})
        else:
            out.append({"type": "audio", "audio": base64.b64decode(p["input_audio"]["data"])})
    return phimm.Request(messages=[{"role": "user", "content": out}])


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ------------------------------------------------------------------------------------------------ chat


@pytest.mark.parametrize("route", list(CASES))
def test_chat_on_every_route(server, model_name, local, route):
    parts, expected = CASES[route]
    resp = server.client().chat.completions.create(model=model_name, max_tokens=MAX_TOKENS,
                                                   messages=[{"role": "user", "content": parts}])
    ref = local(local_request(parts), max_new_tokens=MAX_TOKENS)
    assert resp.choices[0].message.content == ref.text == expected
    assert resp.model_extra["route"] == str(ref.route) == route
    assert resp.choices[0].finish_reason == "stop" and resp.object == "chat.completion"
    assert resp.usage.prompt_tokens == ref.prompt_tokens and resp.usage.completion_tokens == len(ref.token_ids)


@pytest.mark.parametrize("route", list(CASES))
def test_streamed_chat_on_every_route(server, model_name, route):
    parts, expected = CASES[route]
    chunks = list(server.client().chat.completions.create(
        model=model_name, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": parts}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].model_extra["route"] == route and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_forced_adapter_and_sampling_options(server, model_name):
    parts, _ = CASES["none"]
    client = server.client()
    forced = client.chat.completions.create(model=model_name, max_tokens=4, messages=[
        {"role": "user", "content": parts}], extra_body={"adapter": "speech"})
    assert forced.model_extra["route"] == "speech"
    base = client.chat.completions.create(model=model_name, max_tokens=4, messages=[
        {"role": "user", "content": CASES["vision"][0]}], extra_body={"adapter": "none"})
    assert base.model_extra["route"] == "none"
    a, b = (client.chat.completions.create(model=model_name, max_tokens=8, temperature=1.5, top_p=0.9, seed=7,
                                           messages=[{"role": "user", "content": "count"}]) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content  # the same seed, the same sample
    cut = client.chat.completions.create(model=model_name, max_tokens=12, stop=["ne"],
                                         messages=[{"role": "user", "content": CASES["speech"][0]}])
    assert cut.choices[0].message.content == "four seven o" and cut.choices[0].finish_reason == "stop"
    length = client.chat.completions.create(model=model_name, max_completion_tokens=2,
                                            messages=[{"role": "user", "content": CASES["speech"][0]}])
    assert length.choices[0].finish_reason == "length" and length.usage.completion_tokens == 2


def test_local_media_only_under_the_allowed_folder(server, model_name, media_dir):
    client = server.client()
    ok = client.chat.completions.create(model=model_name, max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(media_dir / "circle.png")}},
        text_part("what color is the circle")]}])
    assert ok.choices[0].message.content == "red" and ok.model_extra["route"] == "vision"
    for url in (str(EXAMPLES / "red_circle_blue_star.png"), str(media_dir / ".." / "x.png"),
                "https://example.com/cat.png"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model_name, max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, text_part("x")]}])
        assert e.value.body["code"] in ("media_not_allowed", "media_not_found")


# ------------------------------------------------------------------------------------------------ transcription


def test_transcription_json_text_and_formats(server, model_name):
    client = server.client()
    wav = (EXAMPLES / "a_red_circle_and_a_blue_star.wav").read_bytes()
    got = client.audio.transcriptions.create(model=model_name, file=("clip.wav", wav), response_format="json")
    assert got.text == "a red circle and a blue star"
    text = client.audio.transcriptions.create(model=model_name, file=("clip.wav", wav), response_format="text")
    assert text.strip() == "a red circle and a blue star"
    verbose = server.post("/v1/audio/transcriptions", files={"file": ("clip.wav", wav)},
                          data={"model": model_name, "response_format": "verbose_json", "language": "en"}).json()
    assert verbose["text"] == got.text and verbose["segments"][0]["end"] == pytest.approx(verbose["duration"])
    srt = server.post("/v1/audio/transcriptions", files={"file": ("clip.wav", wav)},
                      data={"model": model_name, "response_format": "srt"}).text
    assert srt.startswith("1\n00:00:00,000 --> ") and got.text in srt
    vtt = server.post("/v1/audio/transcriptions", files={"file": ("clip.wav", wav)},
                      data={"model": model_name, "response_format": "vtt"}).text
    assert vtt.startswith("WEBVTT") and got.text in vtt


def test_streamed_transcription(server, model_name):
    wav = (EXAMPLES / "digits_four_seven_one_nine.wav").read_bytes()
    events = list(server.client().audio.transcriptions.create(model=model_name, file=("d.wav", wav), stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert events[-1].type == "transcript.text.done" and events[-1].text == "four seven one nine"
    assert len(deltas) >= 2 and "".join(deltas).strip() == "four seven one nine"


# ------------------------------------------------------------------------------------------------ errors


def test_auth(server, model_name):
    for key in (None, "wrong"):
        with pytest.raises(openai.AuthenticationError) as e:
            server.client(key=key).chat.completions.create(model=model_name, messages=[
                {"role": "user", "content": "hi"}])
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # /health needs no key


def test_bad_requests_get_openai_error_bodies(server, model_name):
    def chat(content, **extra):
        return server.post("/v1/chat/completions", json={"model": model_name, "max_tokens": 2, **extra,
                                                         "messages": [{"role": "user", "content": content}]})

    r = server.post("/v1/chat/completions", content=b'{"model": "x", "messages": [',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]
    r = chat([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}])
    assert r.status_code == 400 and error_of(r)["code"] == "unknown_content_type"
    r = chat([{"type": "input_audio", "input_audio": {"data": "%%% not base64 %%%", "format": "wav"}}])
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_base64"
    junk = base64.b64encode(b"this is not an image at all" * 10).decode()
    r = chat([{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{junk}"}}, text_part("x")])
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_media"
    r = chat([{"type": "input_audio", "input_audio": {"data": junk, "format": "wav"}}, text_part("x")])
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_media"
    r = chat([image_part()] * 9 + [text_part("x")])
    assert r.status_code == 400 and error_of(r)["code"] == "too_many_media"
    r = chat("one two three four " * 400)
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    r = chat("hi", n=2)
    assert r.status_code == 400 and error_of(r)["param"] == "n"
    r = chat("hi", temperature="hot")
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"
    r = chat("hi", adapter="klingon")
    assert r.status_code == 400 and error_of(r)["code"] == "unknown_adapter"
    r = server.post("/v1/chat/completions", json={"model": "another-model", "messages": [
        {"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = server.post("/v1/chat/completions", content=b"x" * 1_100_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"
    r = server.post("/v1/audio/transcriptions", files={"file": ("x.wav", b"RIFF....garbage")},
                    data={"model": model_name})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_media"
    # none of that disturbed the server
    ok = server.client().chat.completions.create(model=model_name, max_tokens=MAX_TOKENS, messages=[
        {"role": "user", "content": CASES["vision"][0]}])
    assert ok.choices[0].message.content == "red"


def test_full_queue_is_refused_with_retry_after(tmp_path):
    s = Server("--max-running", "1", "--max-waiting", "1", tmp=tmp_path)
    try:
        body = {"model": "phimm-embedded", "max_tokens": 300, "min_tokens": 300,
                "messages": [{"role": "user", "content": "count"}]}
        results = []

        def send():
            results.append(s.post("/v1/chat/completions", key=None, json=body))

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) <= {200, 503}
        refused = [r for r in results if r.status_code == 503]
        assert all(r.headers.get("retry-after") and error_of(r)["code"] == "queue_full" for r in refused)
        assert s.post("/v1/chat/completions", key=None, json={**body, "max_tokens": 2, "min_tokens": 0}).status_code == 200
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------ concurrency


def test_24_staggered_mixed_requests_equal_alone(server, model_name):
    client = server.client()
    specs = []
    for i in range(24):
        route = list(CASES)[i % 4]
        min_tokens = 10 if i % 3 == 0 else 0  # some rows run past their answer, so rows overlap in decode
        specs.append((route, min_tokens))
    alone = {}
    for spec in set(specs):
        route, min_tokens = spec
        r = client.chat.completions.create(model=model_name, max_tokens=MAX_TOKENS, messages=[
            {"role": "user", "content": CASES[route][0]}], extra_body={"min_tokens": min_tokens})
        alone[spec] = (r.choices[0].message.content, r.model_extra["route"])
    got = [None] * len(specs)

    def worker(i):
        time.sleep(0.015 * i)  # staggered starts: requests join a batch that is already decoding
        route, min_tokens = specs[i]
        r = client.chat.completions.create(model=model_name, max_tokens=MAX_TOKENS, messages=[
            {"role": "user", "content": CASES[route][0]}], extra_body={"min_tokens": min_tokens})
        got[i] = (r.choices[0].message.content, r.model_extra["route"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(g == alone[spec] for g, spec in zip(got, specs)), [(g, alone[s]) for g, s in zip(got, specs)]
    assert {g[1] for g in got} == set(CASES)


def _metric(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_disconnect_mid_stream_frees_the_row(server, model_name):
    cancelled = _metric(server, "phimm_requests_total", status="cancelled")
    body = {"model": model_name, "max_tokens": 800, "min_tokens": 800, "stream": True,
            "messages": [{"role": "user", "content": "count"}]}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(3)]
            assert any('"route": "none"' in line for line in first)
    # the client is gone: its row leaves the batch at the next step
    deadline = time.time() + 30
    while time.time() < deadline:
        if (_metric(server, "phimm_requests_total", status="cancelled") > cancelled
                and _metric(server, "phimm_running_requests") == 0):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the disconnected request was not cancelled")
    ok = server.client().chat.completions.create(model=model_name, max_tokens=MAX_TOKENS, messages=[
        {"role": "user", "content": CASES["speech"][0]}])
    assert ok.choices[0].message.content == "four seven one nine"


def test_metrics_report_routes_tokens_and_latencies(server, model_name):
    server.client().chat.completions.create(model=model_name, max_tokens=4, messages=[
        {"role": "user", "content": CASES["vision"][0]}])
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("phimm_requests_total", "phimm_prompt_tokens_total", "phimm_generation_tokens_total",
                 "phimm_running_requests", "phimm_waiting_requests", "phimm_time_to_first_token_seconds_bucket",
                 "phimm_inter_token_latency_seconds_bucket"):
        assert name in text, name
    assert _metric(server, "phimm_requests_total", route="vision", status="ok") >= 1
    assert _metric(server, "phimm_time_to_first_token_seconds_count") >= 1


def test_models_endpoint(server, model_name):
    models = server.client().models.list().data
    assert [m.id for m in models] == [model_name] == ["phimm-embedded"]
    assert json.loads(httpx.get(server.url + "/health", timeout=10).text)["status"] == "ok"


def test_engine_worker_death_fails_open_requests_cleanly(tmp_path):
    """The engine runs in a worker process: if it dies, an open stream ends with an error event (not a hang),
    /health reports it, and new requests get 503 instead of waiting forever."""
    s = Server(tmp=tmp_path)
    try:
        children = Path(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children").read_text().split()
        children = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(children) == 1, children  # the engine worker (not multiprocessing's resource tracker)
        body = {"model": "phimm-embedded", "max_tokens": 900, "min_tokens": 900, "stream": True,
                "messages": [{"role": "user", "content": "count"}]}
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", s.url + "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                os.kill(int(children[0]), 9)
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and any('"engine_closed"' in line for line in rest), rest[-3:]
        assert httpx.get(s.url + "/health", timeout=10).status_code == 503
        r = s.post("/v1/chat/completions", key=None, json={**body, "stream": False, "max_tokens": 2,
                                                          "min_tokens": 0})
        assert r.status_code == 503 and error_of(r)["code"] == "engine_closed"
    finally:
        s.stop()


def test_worker_messages_carry_tensors_as_bytes():
    """The pipe between the HTTP process and the engine worker: tensors of every dtype the prepared requests hold
    (and bf16, empty, 0-dim, non-contiguous) come back equal, in messages that hold no shared-memory handles."""
    import pickle

    import torch

    from phimm.errors import ContextLengthError
    from phimm.serve.worker import _dumps

    tensors = [torch.randn(3, 5), torch.randn(4, 6)[:, ::2], torch.arange(7), torch.randn(2, 3).bfloat16(),
               torch.zeros(0, 4), torch.tensor(3.5), torch.rand(2, 2) > 0.5, torch.randn(5, dtype=torch.float16)]
    msg = ("submit", 7, {"t": tensors, "nested": [(tensors[0], "x")]}, ContextLengthError("too long"))
    data = _dumps(msg)
    assert b"rebuild_storage_fd" not in data and b"torch.multiprocessing" not in data
    back = pickle.loads(data)
    for a, b in zip(tensors, back[2]["t"]):
        assert b.dtype == a.dtype and b.shape == a.shape and torch.equal(a, b)
    assert torch.equal(back[2]["nested"][0][0], tensors[0])
    back[2]["t"][0].add_(1)  # writable, and a copy
    assert not torch.equal(back[2]["t"][0], tensors[0])
    assert isinstance(back[3], ContextLengthError) and "too long" in str(back[3])


def test_media_cross_the_pipe_once_while_both_ends_hold_them():
    """The HTTP side's and the worker's `MediaTable`s: a medium the worker holds crosses as its digest; with
    evictions (a small byte limit) and repeats within a request, every request arrives with its own media, and
    both tables hold the same media in the same order after every message."""
    import pickle
    import random

    import torch

    from phimm.serve.worker import MediaRef, MediaTable, _dumps
    from phimm.types import AudioInput, ImageInput, Prepared, tensor_nbytes

    gen = torch.Generator().manual_seed(0)
    pool = [ImageInput(torch.randn(2, 3, 8, 8, generator=gen), torch.ones(2, 4, 4, dtype=torch.bool), (8, 8), 5)
            for _ in range(4)]
    pool += [AudioInput(torch.randn(20, 8, generator=gen), 3, 0.5) for _ in range(3)]
    size = tensor_nbytes(pool[0])
    http, worker = MediaTable(max_bytes=3 * size), MediaTable(max_bytes=3 * size)
    rng = random.Random(0)
    refs = 0
    for _ in range(60):
        images = [m for m in rng.choices(pool[:4], k=rng.randint(0, 2))]
        audios = [m for m in rng.choices(pool[4:], k=rng.randint(0, 2))]
        prepared = Prepared([1, 2, 3], images, audios)
        sent = http.encode(prepared)
        refs += sum(isinstance(m, MediaRef) for m in sent.images + sent.audios)
        got = worker.decode(pickle.loads(_dumps(sent)))
        for a, b in zip(images + audios, got.images + got.audios):
            assert type(a) is type(b) and a.digest() == b.digest()
            assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values())
                       if isinstance(x, torch.Tensor))
        assert list(http.entries) == list(worker.entries) and http.nbytes == worker.nbytes <= 3 * size
        assert prepared.images == images  # the request itself is left as it was
    assert refs > 20
    with pytest.raises(KeyError):  # a reference the worker lacks is an error, not a wrong medium
        MediaTable().decode(Prepared([1], [MediaRef(b"x" * 16)], []))
