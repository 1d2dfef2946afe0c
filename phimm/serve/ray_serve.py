"""Ray Serve: the OpenAI API of `phimm serve` over many replicas, on one machine or a Ray cluster.

    serve run phimm.serve.ray_serve:build_app model=/models/phi4mm num_replicas=2     # http://127.0.0.1:8000/v1
    phimm serve --ray --replicas 2                                                   # the same on a local Ray

Each replica is a Ray actor, so a process of its own: its constructor loads one pipeline with `phimm.load` (one
continuous-batching engine) and builds the FastAPI app of `phimm.serve.app.build_app` over it, the app that
`phimm serve` runs, mounted with `@serve.ingress`. Ray's proxy spreads requests over the replicas (each request
goes to the less busy of two), and each replica batches what it gets continuously, every row on its own adapter.
Adapters are routed inside each replica from the request's content, as in `phimm serve`: every replica holds
every adapter, so Ray's model multiplexing is not used.

What each replica adds to the app: `/health` says which replica answers (`replica`, `pid`, `node`), every
response carries an `x-phimm-replica` header, and every `/metrics` series has a `replica` label (a scrape through
the proxy reaches one replica). For every replica at once, each also reports its engine's counts as Ray Serve
metrics (`ray_phimm_engine_*`, tagged by replica), which Ray's metrics agent exports on every node beside Ray
Serve's own request counts and latencies.

If a replica dies (its process killed, the machine lost), its requests in flight end with an OpenAI-style error
whose `code` is `replica_died` (a stream gets it as its last event, before `data: [DONE]`); a request that had not
been answered yet (a non-streamed one, or a stream before its first chunk) is instead sent once more to a
surviving replica, by a middleware in Ray's HTTP proxy (`proxy_middlewares`, installed by `phimm serve --ray` and
by `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=phimm.serve.ray_serve:proxy_middlewares` on a cluster). New
requests go to the survivors, and Ray starts a new replica in place of the dead one.

This module imports Ray only when a deployment is built (`pip install 'phimm[ray]'`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from typing import Any

log = logging.getLogger("phimm.serve.ray")

RAY_EXTRA_HINT = "pip install 'phimm[ray]'"
DEPLOYMENT_NAME = "phimm"
REPLICA_HEADER = "x-phimm-replica"  # on every response: the replica that answered
RETRIED_HEADER = "x-phimm-retried"  # on a response that a second replica gave, its first one having died

_NONE = ("", "none", "null")


def _opt_str(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return None if s.lower() in _NONE else s


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"expected an integer, got {v!r}")
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError(f"expected an integer, got {v!r}")
        return int(v)
    return int(str(v).strip())


def _opt_int(v: Any) -> int | None:
    return None if v is None or str(v).strip().lower() in _NONE else _int(v)


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r}")
    return float(str(v).strip()) if not isinstance(v, (int, float)) else float(v)


def _opt_float(v: Any) -> float | None:
    return None if v is None or str(v).strip().lower() in _NONE else _float(v)


def _opt_dict(v: Any) -> dict | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in _NONE):
        return None
    if isinstance(v, str):
        v = json.loads(v)
    if not isinstance(v, dict):
        raise ValueError(f"expected a mapping (or its JSON), got {v!r}")
    return dict(v)


def _choice(*allowed):
    def convert(v: Any):
        s = _opt_str(v)
        if s not in allowed:
            raise ValueError(f"expected one of {[a for a in allowed]}, got {v!r}")
        return s
    return convert


# name -> (conversion, default). Ray passes `serve run ... key=value` and a config file's `args` as they are
# (strings from the command line), so every value goes through its conversion.
ARGS: dict[str, tuple[Any, Any]] = {
    # the model, as `phimm.load` takes it
    "model": (_opt_str, None),  # checkpoint folder (default: the embedded model); on a cluster, shared storage
    "dtype": (_choice("float32", "bfloat16"), "float32"),
    "quantize": (_choice(None, "int8", "int4"), None),
    "device": (_opt_str, None),  # default: "cuda" when num_gpus > 0, else "cpu"
    "threads_per_replica": (_int, 1),  # torch threads of each replica
    # replicas
    "num_replicas": (_opt_int, None),  # default 1 (give this or autoscaling_config)
    "autoscaling_config": (_opt_dict, None),  # Ray's, e.g. {"min_replicas": 1, "max_replicas": 8,
    #                                           "target_ongoing_requests": 12} (a dict, or its JSON)
    "num_cpus": (_opt_float, None),  # CPUs Ray reserves per replica (default: threads_per_replica)
    "num_gpus": (_float, 0.0),  # GPUs per replica (a fraction shares one)
    "memory_gb": (_opt_float, None),  # memory Ray reserves per replica, for packing replicas on machines
    "resources": (_opt_dict, None),  # custom Ray resources per replica, e.g. {"phimm-cpu": 1}: which nodes take it
    "max_ongoing_requests": (_opt_int, None),  # requests Ray sends one replica at once (default: 2 x max_running)
    "max_queued_requests": (_int, -1),  # requests waiting in Ray for a replica; more get 503 (-1: no limit)
    "name": (_opt_str, DEPLOYMENT_NAME),  # the deployment's name
    # the limits of `phimm serve`
    "max_running": (_int, 16),
    "max_waiting": (_int, 256),
    "kv_budget_tokens": (_int, 65536),
    "api_key": (_opt_str, None),
    "api_key_env": (_opt_str, None),  # or: the environment variable that holds the key, read in each replica
    "served_model_name": (_opt_str, None),
    "allowed_media_dir": (_opt_str, None),
    "max_body_mb": (_float, 32.0),
    "max_media": (_int, 8),
}


def parse_args(args: dict[str, Any] | None) -> dict[str, Any]:
    """`args` (strings or values) -> every key of `ARGS` with its type; unknown keys and bad values raise
    `ValueError` naming the key."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for phimm.serve.ray_serve:build_app; it takes {sorted(ARGS)}")
    out = {}
    for key, (convert, default) in ARGS.items():
        if key not in args:
            out[key] = default
            continue
        try:
            out[key] = convert(args[key])
        except (TypeError, ValueError) as e:
            raise ValueError(f"argument {key}={args[key]!r}: {e}") from None
    if out["num_replicas"] is not None and out["autoscaling_config"] is not None:
        raise ValueError("give num_replicas or autoscaling_config, not both")
    for key in ("threads_per_replica", "max_running", "max_waiting", "kv_budget_tokens", "max_media"):
        if out[key] < 1:
            raise ValueError(f"argument {key} must be at least 1, got {out[key]}")
    if out["num_replicas"] is not None and out["num_replicas"] < 1:
        raise ValueError(f"argument num_replicas must be at least 1, got {out['num_replicas']}")
    return out


def load_kwargs(a: dict[str, Any]) -> dict[str, Any]:
    """`phimm.load` arguments of one replica (plain data: they travel to the replica's process)."""
    device = a["device"] or ("cuda" if a["num_gpus"] > 0 else "cpu")
    return dict(path=a["model"], device=device, dtype=a["dtype"], quantize=a["quantize"],
                threads=a["threads_per_replica"],
                limits=dict(max_running=a["max_running"], max_waiting=a["max_waiting"],
                            kv_budget_tokens=a["kv_budget_tokens"]))


def config_kwargs(a: dict[str, Any]) -> dict[str, Any]:
    """`ServeConfig` fields of every replica (the replica adds its own labels)."""
    return dict(served_model_name=a["served_model_name"], api_key=a["api_key"],
                allowed_media_dir=a["allowed_media_dir"], max_body_mb=a["max_body_mb"], max_media=a["max_media"])


def deployment_options(a: dict[str, Any]) -> dict[str, Any]:
    """`Deployment.options(...)`: replicas, what Ray reserves for each, and how many requests it sends each."""
    threads = a["threads_per_replica"]
    actor: dict[str, Any] = {
        "num_cpus": a["num_cpus"] if a["num_cpus"] is not None else float(threads),
        # torch and OpenMP in the replica's process use the threads it was given, not every core of the node
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads), "PHIMM_THREADS": str(threads),
                                     "TOKENIZERS_PARALLELISM": "false"}},
    }
    if a["num_gpus"]:
        actor["num_gpus"] = a["num_gpus"]
    if a["memory_gb"]:
        actor["memory"] = int(a["memory_gb"] * 2**30)
    if a["resources"]:
        actor["resources"] = {str(k): float(v) for k, v in a["resources"].items()}
    opts: dict[str, Any] = {
        "name": a["name"],
        "ray_actor_options": actor,
        # up to max_running rows decode; as many again wait inside the replica, so a finished row's place is
        # taken at the next step; the rest wait in Ray, for whichever replica frees a place first
        "max_ongoing_requests": a["max_ongoing_requests"] or 2 * a["max_running"],
        "max_queued_requests": a["max_queued_requests"],
        "health_check_period_s": 5,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 20,
    }
    if a["autoscaling_config"] is not None:
        opts["autoscaling_config"] = a["autoscaling_config"]
    else:
        opts["num_replicas"] = a["num_replicas"] or 1
    return opts


# ------------------------------------------------------------------------------------------------ the replica

_REPLICA_APP = None  # this process's app: a Ray replica is a process of its own (one actor per process)


class ReplicaApp:
    """The ASGI app `@serve.ingress` mounts: it hands every call to the FastAPI app that `build_app` made in this
    process's replica constructor (Ray pickles the ingress app when the deployment is defined, before any model is
    loaded; this stand-in is what travels), and adds the `x-phimm-replica` header to every response."""

    async def __call__(self, scope, receive, send):
        app = _REPLICA_APP
        if app is None:
            raise RuntimeError("this process has no phimm replica app")
        if scope["type"] != "http":
            return await app(scope, receive, send)
        header = (REPLICA_HEADER.encode(), _REPLICA_ID.encode())

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        await app(scope, receive, tagged)

    def __getattr__(self, name: str):
        # Ray looks at the mounted app's routes and adds its exception handlers to it: they go to the real app
        if name.startswith("__") or _REPLICA_APP is None:
            raise AttributeError(name)
        return getattr(_REPLICA_APP, name)


_REPLICA_ID = ""


def _replica_id() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_tag)
    except Exception:  # noqa: BLE001 - outside Ray Serve (a unit test): the process is the replica
        return f"pid{os.getpid()}"


class PhimmReplica:
    """One replica: one pipeline, one engine, the OpenAI app over it."""

    def __init__(self, load: dict[str, Any], config: dict[str, Any], api_key_env: str | None = None):
        global _REPLICA_APP, _REPLICA_ID
        import phimm
        from phimm.engine import EngineLimits

        from .app import ServeConfig, build_app as build_http_app

        replica = _replica_id()
        config = dict(config)
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise RuntimeError(f"api_key_env={api_key_env!r}: that environment variable is not set in the "
                                   f"replica's process")
            config["api_key"] = key
        kwargs = {**load, "limits": EngineLimits(**load["limits"])}
        self.pipe = phimm.load(**kwargs)
        self.pipe.stats()  # the engine is started before the replica counts as ready
        info = {"replica": replica, "pid": os.getpid(), "node": socket.gethostname()}
        self.config = ServeConfig(**config, metric_labels={"replica": replica}, health_info=info)
        _REPLICA_ID = replica
        _REPLICA_APP = build_http_app(self.pipe, self.config)
        self._stop = threading.Event()
        threading.Thread(target=_export_engine_metrics, args=(self.pipe, self._stop), name="phimm-ray-metrics",
                         daemon=True).start()
        log.info("replica %s (pid %d) serves %s", replica, os.getpid(), self.pipe)

    def check_health(self) -> None:
        """Ray calls this every few seconds; raising makes Ray replace the replica."""
        engine = getattr(self.pipe, "_engine", None)
        if engine is not None and getattr(engine, "_closed", False):
            raise RuntimeError("the replica's engine has stopped")

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            pipe.close()


METRICS_EVERY_S = 2.0


def _export_engine_metrics(pipe, stop: threading.Event) -> None:
    """The engine's counts as Ray Serve metrics (`ray.serve.metrics`, tagged with the application, deployment and
    replica), which Ray's metrics agent exports on every node: the aggregate over replicas that a scrape of
    /metrics through the proxy (one replica's) is not. Prometheus names: `ray_phimm_engine_running_requests`, ..."""
    try:
        from ray.serve import metrics
    except ImportError:
        return
    gauges = {k: metrics.Gauge(f"phimm_engine_{k}", description=d) for k, d in (
        ("running_requests", "Rows in the replica's running batch"),
        ("waiting_requests", "Requests queued in the replica's engine"),
        ("kv_positions", "KV-cache positions the replica's running batch holds"))}
    counters = {k: metrics.Counter(f"phimm_engine_{k}", description=d) for k, d in (
        ("generated_tokens", "Tokens the replica generated"),
        ("prompt_tokens", "Prompt tokens the replica prefilled"),
        ("busy_seconds", "Seconds the replica's engine spent in steps"))}
    last = {k: 0.0 for k in counters}
    while not stop.wait(METRICS_EVERY_S):
        try:
            st = pipe.stats()
            gauges["running_requests"].set(st.get("running", 0))
            gauges["waiting_requests"].set(st.get("waiting", 0))
            gauges["kv_positions"].set(st.get("kv_positions", 0))
            now = {"generated_tokens": st.get("generated_tokens", 0), "prompt_tokens": st.get("prompt_tokens", 0),
                   "busy_seconds": st.get("busy_s", 0.0)}
            for k, v in now.items():
                if v > last[k]:
                    counters[k].inc(v - last[k])
                    last[k] = v
        except Exception:  # noqa: BLE001 - metrics must never take the replica down
            log.debug("exporting engine metrics failed", exc_info=True)


_DEPLOYMENT = None


def deployment():
    """The Ray Serve deployment class (made once per process: Ray is imported only here)."""
    global _DEPLOYMENT
    if _DEPLOYMENT is None:
        try:
            from ray import serve
        except ImportError as e:
            raise ImportError(f"phimm on Ray Serve needs Ray ({e.name} is missing): {RAY_EXTRA_HINT}") from None
        _DEPLOYMENT = serve.deployment(name=DEPLOYMENT_NAME)(serve.ingress(ReplicaApp())(PhimmReplica))
    return _DEPLOYMENT


def build_app(args: dict[str, Any] | None = None):
    """Ray Serve's application builder: `serve run phimm.serve.ray_serve:build_app model=PATH num_replicas=2`, a
    config file's `import_path: phimm.serve.ray_serve:build_app` with `args`, or `serve.run(build_app({...}))`.
    The keys are those of `ARGS` (strings are converted)."""
    a = parse_args(args)
    dep = deployment()
    return dep.options(**_for_this_ray(dep, deployment_options(a))).bind(load_kwargs(a), config_kwargs(a),
                                                                         a["api_key_env"])


def _for_this_ray(dep, opts: dict[str, Any]) -> dict[str, Any]:
    """`opts` as this Ray's `Deployment.options` takes them: Ray before 2.10 calls `max_ongoing_requests`
    `max_concurrent_queries` and has no `max_queued_requests`."""
    import inspect

    accepted = inspect.signature(dep.options).parameters
    if "max_ongoing_requests" not in accepted and "max_concurrent_queries" in accepted:
        opts["max_concurrent_queries"] = opts.pop("max_ongoing_requests")
    for key in [k for k in opts if k not in accepted]:
        log.warning("this Ray's deployments have no option %r; ignored", key)
        del opts[key]
    return opts


# ------------------------------------------------------------------------------------------------ the proxy

REPLICA_DIED_MESSAGE = ("the replica serving this request died before it finished; retry the request (new "
                        "requests go to the surviving replicas while Ray replaces it)")


def _replica_died_body() -> bytes:
    return json.dumps({"error": {"message": REPLICA_DIED_MESSAGE, "type": "server_unavailable", "param": None,
                                 "code": "replica_died"}}).encode()


class ReplicaFailover:
    """ASGI middleware for Ray Serve's HTTP proxy: turns a replica's death into an answer a client understands.

    - Nothing sent yet (a non-streamed request, or a stream before its first chunk): the request is sent again,
      once, and Ray's router gives it to a surviving replica (its answer has an `x-phimm-retried: 1` header); if
      that fails too, the client gets 503 with an OpenAI error body (`code: replica_died`) and `Retry-After`.
      A request whose client went away is not sent again.
    - A stream already under way: its last events are an error event (`code: replica_died`) and
      `data: [DONE]`, as when `phimm serve`'s engine worker dies, instead of a cut connection.

    Ray's proxy answers a request whose replica died with a bare 500 (or, mid-stream, ends the response
    unfinished); the app's own errors always carry a JSON body, so a 500 without one is taken as the replica's
    death. Request bodies are buffered (up to `max_body_bytes`; larger ones pass through without retry)."""

    def __init__(self, app, retries: int = 1, max_body_bytes: int = 64 * 2**20):
        self.app = app
        self.retries = retries
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # read the body first, so that it can be sent again
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before it finished sending
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if more and size > self.max_body_bytes:  # too large to keep: stream the rest through, no retry
                return await self.app(scope, _Replay(chunks, receive, more=True), send)
        body = b"".join(chunks)
        for attempt in range(self.retries + 1):
            outcome = await self._attempt(scope, body, receive, send, attempt, last=attempt == self.retries)
            if outcome != "retry":
                return
            log.warning("a replica died before answering %s; sending it again", scope.get("path"))

    async def _attempt(self, scope, body: bytes, receive, send, attempt: int, last: bool) -> str:
        state = {"start": None, "started": False, "finished": False, "sse": False, "held": []}

        async def watch(message):
            kind = message["type"]
            if kind == "http.response.start" and not state["started"]:
                if attempt:  # say that this answer comes from a second try
                    message = {**message, "headers": [*message.get("headers", ()),
                                                      (RETRIED_HEADER.encode(), str(attempt).encode())]}
                if message["status"] == 500:  # maybe a dead replica's: decided by its body
                    state["start"] = message
                    return
                state["started"] = True
                state["sse"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                   for k, v in message.get("headers", ()))
                return await send(message)
            if kind == "http.response.body":
                if state["start"] is not None:  # a held 500: the app's errors are JSON, Ray's are not
                    state["held"].append(message)
                    if not message.get("more_body", False):
                        data = b"".join(m.get("body", b"") for m in state["held"])
                        if not data.lstrip().startswith(b"{"):
                            state["finished"] = "retry"
                            return
                        state["started"], start, state["start"] = True, state["start"], None
                        await send(start)
                        for m in state["held"]:
                            await send(m)
                        state["finished"] = True
                    return
                if not message.get("more_body", False):
                    state["finished"] = True
                return await send(message)
            return await send(message)

        error = None
        replay = _Replay([body], receive)
        try:
            await self.app(scope, replay, watch)
        except Exception as e:  # noqa: BLE001 - the proxy's own failure to reach a replica
            error = e
        if replay.disconnected and not state["started"]:
            return "done"  # the client went away: nobody to answer
        if state["finished"] == "retry" or (not state["started"] and not state["finished"]):
            if not last:
                return "retry"
            payload = _replica_died_body()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode()), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": payload})
            return "done"
        if state["started"] and not state["finished"]:  # cut mid-response
            log.warning("a replica died mid-response to %s: %r", scope.get("path"), error)
            if not state["sse"]:  # a body cut short must not look whole: drop the connection
                raise RuntimeError("the replica died mid-response")
            tail = b"data: " + _replica_died_body() + b"\n\ndata: [DONE]\n\n"
            try:
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            except Exception:  # noqa: BLE001 - the client is gone as well
                pass
        return "done"


class _Replay:
    """A `receive` that gives the buffered body first (as one message), then waits on the real one (for the
    client's disconnect, which it remembers)."""

    def __init__(self, chunks: list[bytes], receive, more: bool = False):
        self.pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": more}]
        self.receive = receive
        self.disconnected = False

    async def __call__(self):
        if self.pending:
            return self.pending.pop()
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
        return message


def proxy_middlewares() -> list:
    """For Ray Serve's HTTP proxy (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=phimm.serve.ray_serve:proxy_middlewares`
    in the environment of every Ray node): `ReplicaFailover`."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaFailover)]
