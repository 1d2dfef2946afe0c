"""Ray Serve (`phimm serve --ray`, `phimm.serve.ray_serve`), tested as users reach it: `phimm serve --ray
--replicas 2` runs as a subprocess (a local Ray of its own, the HTTP proxy on a free loopback port, two replicas
of the embedded model with one thread each) and the official `openai` client talks to it; this process joins that
Ray only to read `serve.status()`. Answers are checked against the same requests run by a pipeline in this
process. The manifest and argument tests need no Ray."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_serve import CASES, KEY, MAX_TOKENS, free_port, local_request  # noqa: E402 - the requests of tests/test_serve.py

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "demo" / "examples"
MANIFEST = ROOT / "docs" / "rayservice.yaml"
RAY_REASON = "Ray Serve is not installed: pip install 'phimm[ray]' (or the test extra)"


# ------------------------------------------------------------------------------------------------ no Ray needed


def test_manifest_names_the_app_builder():
    yaml = pytest.importorskip("yaml", reason="pyyaml is needed to parse docs/rayservice.yaml")
    import phimm.serve.ray_serve as ray_serve

    doc = yaml.safe_load(MANIFEST.read_text())
    assert doc["apiVersion"].startswith("ray.io/") and doc["kind"] == "RayService"
    apps = doc["spec"]["serveConfigV2"]
    apps = yaml.safe_load(apps) if isinstance(apps, str) else apps
    paths = {a["import_path"] for a in apps["applications"]}
    assert paths == {"phimm.serve.ray_serve:build_app"}
    module, _, name = "phimm.serve.ray_serve:build_app".partition(":")
    assert module == ray_serve.__name__ and callable(getattr(ray_serve, name))
    for a in apps["applications"]:  # every argument is one the builder takes, and converts
        ray_serve.parse_args(a.get("args", {}))
    gpus = [a for a in apps["applications"] if float(a["args"].get("num_gpus", 0)) > 0]
    assert gpus and len(gpus) < len(apps["applications"])  # GPU and CPU replicas
    auto = [a["args"]["autoscaling_config"] for a in apps["applications"]]
    assert all("target_ongoing_requests" in (c if isinstance(c, dict) else json.loads(c)) for c in auto)
    groups = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    claims = [v["persistentVolumeClaim"]["claimName"] for g in groups
              for v in g["template"]["spec"].get("volumes", []) if "persistentVolumeClaim" in v]
    assert len(claims) == len(groups)  # every worker reads the checkpoint from the shared PVC


def test_scale_out_doc_shows_the_manifest_file():
    yaml = pytest.importorskip("yaml", reason="pyyaml is needed to parse docs/rayservice.yaml")
    doc = (ROOT / "docs" / "SCALE-OUT.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if "kind: RayService" in b]
    assert len(blocks) == 1 and yaml.safe_load(blocks[0]) == yaml.safe_load(MANIFEST.read_text())


def test_builder_arguments_from_strings():
    from phimm.serve.ray_serve import deployment_options, load_kwargs, parse_args

    a = parse_args({"model": "/models/phi4mm", "num_replicas": "3", "threads_per_replica": "2", "dtype": "bfloat16",
                    "quantize": "none", "max_running": "8", "max_body_mb": "16", "api_key": "", "num_gpus": "0.5"})
    assert (a["num_replicas"], a["threads_per_replica"], a["quantize"], a["max_running"]) == (3, 2, None, 8)
    assert a["max_body_mb"] == 16.0 and a["api_key"] is None
    kw = load_kwargs(a)
    assert kw["device"] == "cuda" and kw["threads"] == 2 and kw["limits"]["max_running"] == 8
    opts = deployment_options(a)
    assert opts["num_replicas"] == 3 and opts["max_ongoing_requests"] == 16
    assert opts["ray_actor_options"]["num_cpus"] == 2 and opts["ray_actor_options"]["num_gpus"] == 0.5
    auto = parse_args({"autoscaling_config": '{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}'})
    assert "num_replicas" not in deployment_options(auto)
    assert deployment_options(auto)["autoscaling_config"]["target_ongoing_requests"] == 8
    assert load_kwargs(parse_args({}))["device"] == "cpu"
    for bad in ({"num_replica": "2"}, {"num_replicas": "two"}, {"dtype": "float16"}, {"max_running": "0"},
                {"num_replicas": "2", "autoscaling_config": "{}"}):
        with pytest.raises(ValueError):
            parse_args(bad)


def _asgi_call(app, body: bytes = b"{}", disconnect_after_s: float | None = None):
    """Run one POST through the ASGI `app`: (status, headers, body, number of times the inner app ran)."""
    import asyncio

    sent = []

    async def main():
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            if disconnect_after_s is not None:
                await asyncio.sleep(disconnect_after_s)
                return {"type": "http.disconnect"}
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        await app({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}, receive, send)

    asyncio.run(main())
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return (start["status"] if start else None), dict(start["headers"]) if start else {}, data


class _FakeProxy:
    """Stands in for Ray's proxy app: each call plays the next script ("died", "json500", "ok", "sse_cut",
    "disconnect")."""

    def __init__(self, *script: str):
        self.script = list(script)
        self.calls = 0

    async def __call__(self, scope, receive, send):
        import asyncio

        self.calls += 1
        step = self.script.pop(0)
        assert (await receive())["body"] == b'{"x": 1}'  # the body, replayed to every attempt
        if step == "died":  # what Ray's proxy answers when the replica died before answering
            await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"Internal Server Error"})
        elif step == "json500":  # the app's own error
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b'{"error": {"code": "x"}}'})
        elif step == "ok":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b'{"ok": true}'})
        elif step == "sse_cut":  # a stream under way, then the replica died: Ray's proxy just stops
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        elif step == "disconnect":  # the client went away: Ray's proxy cancels the request, answers nothing
            assert (await receive())["type"] == "http.disconnect"
        await asyncio.sleep(0)


def test_failover_middleware_retries_unanswered_and_ends_cut_streams():
    from phimm.serve.ray_serve import RETRIED_HEADER, ReplicaFailover

    body = b'{"x": 1}'
    proxy = _FakeProxy("died", "ok")  # died before answering: sent again, answered by another replica
    status, headers, data = _asgi_call(ReplicaFailover(proxy), body)
    assert (status, data, proxy.calls) == (200, b'{"ok": true}', 2) and headers[RETRIED_HEADER.encode()] == b"1"
    proxy = _FakeProxy("died", "died")  # twice: a clear 503
    status, headers, data = _asgi_call(ReplicaFailover(proxy), body)
    assert status == 503 and json.loads(data)["error"]["code"] == "replica_died" and headers[b"retry-after"]
    proxy = _FakeProxy("json500")  # the app's own 500 is an answer: as it is, once
    assert _asgi_call(ReplicaFailover(proxy), body)[::2] == (500, b'{"error": {"code": "x"}}') and proxy.calls == 1
    proxy = _FakeProxy("sse_cut")  # a stream cut short: an error event and [DONE], not a cut connection
    status, _, data = _asgi_call(ReplicaFailover(proxy), body)
    events = data.decode().strip().split("\n\n")
    assert status == 200 and events[-1] == "data: [DONE]" and '"replica_died"' in events[-2] and proxy.calls == 1
    proxy = _FakeProxy("disconnect")  # the client left: nothing is sent again
    assert _asgi_call(ReplicaFailover(proxy), body, disconnect_after_s=0.01)[0] is None and proxy.calls == 1


# ------------------------------------------------------------------------------------------------ on Ray


class RayServer:
    """`phimm serve --ray` in a subprocess; this process joins its Ray (for `serve.status()`). `stop()` sends
    SIGTERM (the command shuts Serve and Ray down), then kills."""

    def __init__(self, *args: str, tmp: Path, timeout_s: float = 150):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"ray-serve-{self.port}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PHIMM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "RAY_USAGE_STATS_ENABLED": "0"}
        self.log = open(self.log_path, "w")
        from phimm.bench_serve import _die_with_parent  # SIGTERM, so a clean Ray shutdown, should pytest die

        self.proc = subprocess.Popen([sys.executable, "-m", "phimm.cli", "serve", "--ray", "--port", str(self.port),
                                      "--log-level", "warning", *args],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self.address = None
        self.joined = False
        try:
            deadline = time.time() + timeout_s
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"phimm serve --ray exited: {self.tail()}")
                m = re.search(r"Ray at (\S+)", self.log_path.read_text())
                if m:
                    self.address = m.group(1)
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        return
                time.sleep(0.5)
            raise RuntimeError(f"phimm serve --ray was not ready in {timeout_s:g} s: {self.tail()}")
        except BaseException:
            self.stop()
            raise

    def tail(self) -> str:
        return self.log_path.read_text()[-4000:]

    def join_ray(self) -> None:
        import ray

        if not self.joined:
            ray.init(address=self.address, log_to_driver=False, logging_level="ERROR")
            self.joined = True

    def status(self):
        from ray import serve

        self.join_ray()
        return serve.status().applications["phimm"].deployments["phimm"]

    def stop(self) -> None:
        if self.joined:
            import ray

            ray.shutdown()  # leaves the cluster; the command's own shutdown stops it
            self.joined = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.log.close()

    def client(self, key: str | None = KEY, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", timeout=90, max_retries=0, **kw)

    def health_pids(self, tries: int = 30) -> dict[str, int]:
        """replica -> pid, from /health answers (each goes to one replica, by Ray's choice)."""
        seen: dict[str, int] = {}
        for _ in range(tries):
            h = httpx.get(self.url + "/health", timeout=10).json()
            seen[h["replica"]] = h["pid"]
        return seen


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # a new local Ray turns its token authentication on (unless RAY_AUTH_MODE, which both processes see, says
    # otherwise); a driver that joins it by its address must turn it on too, before Ray is imported
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        pytest.importorskip("ray.serve", reason=RAY_REASON)
        pytest.importorskip("openai")
        s = RayServer("--replicas", "2", "--threads", "1", "--api-key", KEY, tmp=tmp_path_factory.mktemp("ray"))
        try:
            yield s
        finally:
            s.stop()
    finally:
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)


@pytest.fixture(scope="module")
def local():
    import phimm

    pipe = phimm.load(threads=1)
    yield pipe
    pipe.close()


def test_both_replicas_running(server):
    status = server.status()
    assert status.replica_states == {"RUNNING": 2}, status
    pids = server.health_pids()
    assert len(pids) == 2 and len(set(pids.values())) == 2, pids  # two replicas, two processes, both answer
    h = httpx.get(server.url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["model"] == "phimm-embedded" and h["pid"] in pids.values()


def _chat(client, parts, stream: bool, **kw):
    """(text, route, replica) of one chat completion, streamed or not."""
    messages = [{"role": "user", "content": parts}]
    if not stream:
        raw = client.chat.completions.with_raw_response.create(model="phimm-embedded", max_tokens=MAX_TOKENS,
                                                               messages=messages, **kw)
        resp = raw.parse()
        return resp.choices[0].message.content, resp.model_extra["route"], raw.headers["x-phimm-replica"]
    with client.chat.completions.with_streaming_response.create(model="phimm-embedded", max_tokens=MAX_TOKENS,
                                                                messages=messages, stream=True, **kw) as raw:
        replica = raw.headers["x-phimm-replica"]
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[0].model_extra["route"], replica


def test_chat_on_every_route_equals_one_process(server, local):
    """Text, image, audio and image + audio, streamed and not, all at once: the answers and routes of the single
    process pipeline, and both replicas answer some."""
    client = server.client()
    jobs = [(route, stream) for route in CASES for stream in (False, True)] * 2
    got: dict[int, tuple] = {}

    def run(i):
        route, stream = jobs[i]
        got[i] = _chat(client, CASES[route][0], stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert len(got) == len(jobs)
    for route, (parts, expected) in CASES.items():
        ref = local(local_request(parts), max_new_tokens=MAX_TOKENS)
        assert ref.text == expected and str(ref.route) == route
        for i, (r, _) in enumerate(jobs):
            if r == route:
                assert got[i][:2] == (ref.text, route), (jobs[i], got[i])
    assert len({g[2] for g in got.values()}) == 2, got  # Ray spread the requests over both replicas


def test_transcription_auth_and_errors_as_phimm_serve(server):
    client = server.client()
    wav = (EXAMPLES / "digits_four_seven_one_nine.wav").read_bytes()
    got = client.audio.transcriptions.create(model="phimm-embedded", file=("d.wav", wav), response_format="json")
    assert got.text == "four seven one nine"
    import openai

    with pytest.raises(openai.AuthenticationError) as e:
        server.client(key="wrong").chat.completions.create(model="phimm-embedded", messages=[
            {"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                   json={"model": "phimm-embedded", "messages": [{"role": "user", "content": [
                       {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_content_type"  # not retried, as is


def test_metrics_name_the_replica_that_answers(server):
    client = server.client()
    for _ in range(4):
        _chat(client, CASES["vision"][0], stream=False)
    seen = {}
    for _ in range(20):
        r = httpx.get(server.url + "/metrics", timeout=10)
        replica = r.headers["x-phimm-replica"]
        series = [line for line in r.text.splitlines() if line.startswith("phimm_requests_total{")]
        assert series and all(f'replica="{replica}"' in line for line in series), r.text[:2000]
        seen[replica] = sum(float(line.rsplit(" ", 1)[1]) for line in series if 'route="vision"' in line)
    assert len(seen) == 2 and sum(seen.values()) >= 4, seen


def test_replica_death_fails_or_retries_and_ray_replaces_it(server):
    """Kill one replica's process while requests run on both: its streams end with a `replica_died` error event
    and [DONE]; non-streamed requests (nothing sent yet) are answered by the survivor; requests sent right after
    go to the survivor; Ray starts a new replica in its place."""
    body = {"model": "phimm-embedded", "max_tokens": 900, "min_tokens": 900,
            "messages": [{"role": "user", "content": "count"}]}
    headers = {"Authorization": f"Bearer {KEY}"}
    streams: dict[int, dict] = {}
    plain: dict[int, httpx.Response | BaseException] = {}
    started = threading.Semaphore(0)

    def stream(i):
        rec = streams.setdefault(i, {"lines": [], "replica": None, "error": None})
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                              headers=headers, timeout=120) as r:
                rec["replica"] = r.headers.get("x-phimm-replica")
                for line in r.iter_lines():
                    if line:
                        rec["lines"].append(line)
                        if len(rec["lines"]) == 3:
                            started.release()
        except BaseException as e:  # noqa: BLE001 - checked below
            rec["error"] = e
            started.release()

    def post(i):
        try:
            plain[i] = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=120)
        except BaseException as e:  # noqa: BLE001 - checked below
            plain[i] = e

    pids = server.health_pids()  # while both are idle (a busy replica gets few of them)
    assert len(pids) == 2, pids
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    # enough plain requests that the load-aware router puts some on both replicas, whichever is killed
    threads += [threading.Thread(target=post, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for _ in range(3):
        assert started.acquire(timeout=60), "the streams did not start"
    time.sleep(0.3)  # the non-streamed requests are decoding too
    assert all(s["error"] is None for s in streams.values()), streams
    victim_replica = streams[0]["replica"]
    victim = pids[victim_replica]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()

    after = [_chat(server.client(), CASES["none"][0], stream=False) for _ in range(3)]  # sent right after
    for t in threads:
        t.join(timeout=180)
    assert all(a[:2] == (CASES["none"][1], "none") and a[2] != victim_replica for a in after), after

    on_victim = [s for s in streams.values() if s["replica"] == victim_replica]
    survived = [s for s in streams.values() if s["replica"] != victim_replica]
    for s in on_victim:  # a clear error as the stream's last event, not a cut connection
        assert s["error"] is None and s["lines"][-1] == "data: [DONE]", s["lines"][-3:]
        assert '"code": "replica_died"' in s["lines"][-2], s["lines"][-3:]
    for s in survived:
        assert s["error"] is None and s["lines"][-1] == "data: [DONE]" and '"length"' in s["lines"][-2]
    answers = set()
    retried = 0
    for i, r in plain.items():
        assert isinstance(r, httpx.Response) and r.status_code == 200, (i, r if not hasattr(r, "text") else r.text)
        assert r.headers["x-phimm-replica"] != victim_replica
        retried += r.headers.get("x-phimm-retried") == "1"
        answers.add(r.json()["choices"][0]["message"]["content"])
    assert len(answers) == 1  # the same greedy answer, first try or second
    assert retried >= 1, "no non-streamed request was on the killed replica"

    deadline = killed_at + 120
    while time.time() < deadline:  # Ray replaces the replica
        if server.status().replica_states == {"RUNNING": 2}:
            pids_now = server.health_pids(tries=20)
            if len(pids_now) == 2 and victim not in pids_now.values():
                break
        time.sleep(1)
    else:
        pytest.fail(f"Ray did not replace the killed replica: {server.status()}")
    assert _chat(server.client(), CASES["speech"][0], stream=True)[:2] == (CASES["speech"][1], "speech")
