"""`phimm serve`: the command line of the OpenAI-compatible server (this module imports no server library, so
registering the subcommand costs nothing)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
SERVE_EXTRA_HINT = "pip install 'phimm[serve]'"
RAY_EXTRA_HINT = "pip install 'phimm[ray]'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default: {DEFAULT_HOST}; another address without --api-key warns)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the folder's name, 'phimm-embedded' for the default)")
    p.add_argument("--max-running", type=int, default=16, help="rows decoding together (default: 16)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued beyond the running ones; more get 503 with Retry-After (default: 256)")
    p.add_argument("--kv-budget-tokens", type=int, default=65536,
                   help="KV-cache positions the running batch may hold (default: 65536)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="int8 or group-wise int4 weights for the base decoder")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per two cores)")
    p.add_argument("--allowed-media-dir", default=None,
                   help="allow image_url / audio_url to name local files under this folder (default: data: URLs only)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MB (default: 32)")
    p.add_argument("--max-media", type=int, default=8, help="images and audio clips per request (default: 8)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--in-process", action="store_true",
                   help="run the engine in the HTTP process (default: a worker process of its own, so that HTTP "
                        "work and decode steps do not take turns on one Python interpreter)")
    p.add_argument("--ray", action="store_true",
                   help=f"serve over Ray Serve replicas, each a process with its own engine, on a local Ray started "
                        f"for this command ({RAY_EXTRA_HINT}; a Ray cluster: docs/SCALE-OUT.md)")
    p.add_argument("--replicas", type=int, default=2,
                   help="with --ray: how many replicas (default: 2); --threads is then per replica "
                        "(default: one per two cores, shared out among the replicas)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def config_from_args(args):
    from .app import ServeConfig

    return ServeConfig(served_model_name=args.served_model_name, api_key=args.api_key,
                       allowed_media_dir=args.allowed_media_dir, max_body_mb=args.max_body_mb,
                       max_media=args.max_media)


def load_kwargs_from_args(args) -> dict:
    """`phimm.load` arguments (plain data: they travel to the engine worker process)."""
    return dict(path=args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                threads=args.threads, limits=dict(max_running=args.max_running, max_waiting=args.max_waiting,
                                                  kv_budget_tokens=args.kv_budget_tokens))


def loader_from_args(args):
    """Loads the model in an engine worker process (`phimm.serve.worker`), or in this process with
    `--in-process`."""
    kwargs = load_kwargs_from_args(args)

    def load():
        if getattr(args, "in_process", False):
            import phimm
            from phimm.engine import EngineLimits

            return phimm.load(**{**kwargs, "limits": EngineLimits(**kwargs["limits"])})
        from .worker import EngineProcess

        return EngineProcess(kwargs)

    return load


def _warn_if_open(args) -> None:
    if not is_loopback(args.host) and not args.api_key:
        bar = "!" * 78
        print(f"{bar}\nWARNING: phimm serve binds {args.host} WITHOUT --api-key: anyone who can reach this "
              f"machine\ncan use the model. Pass --api-key, or bind 127.0.0.1 behind a reverse proxy.\n{bar}",
              file=sys.stderr)


def ray_threads(args) -> int:
    """Torch threads of each replica with --ray: --threads, or the default's share (one per two cores)."""
    if args.threads:
        return args.threads
    from ..pipeline import default_threads

    return max(1, default_threads() // max(1, args.replicas))


def ray_args_from_args(args) -> dict:
    """The arguments of `phimm.serve.ray_serve:build_app` for these command-line options."""
    gpus = 1.0 if str(args.device).startswith("cuda") else 0.0
    return dict(model=args.model, dtype=args.dtype, quantize=args.quantize, device=args.device,
                threads_per_replica=ray_threads(args), num_replicas=args.replicas, num_gpus=gpus,
                max_running=args.max_running, max_waiting=args.max_waiting, kv_budget_tokens=args.kv_budget_tokens,
                api_key=args.api_key, served_model_name=args.served_model_name,
                allowed_media_dir=args.allowed_media_dir, max_body_mb=args.max_body_mb, max_media=args.max_media)


def cmd_serve_ray(args) -> int:
    """`phimm serve --ray`: a local Ray (this command's, stopped with it), Ray Serve's HTTP proxy on --host:--port,
    --replicas replicas of the phimm app; blocks until Ctrl-C or SIGTERM."""
    import os
    import signal
    import time

    if args.replicas < 1:
        print("phimm serve: --replicas must be at least 1", file=sys.stderr)
        return 2
    # a local cluster talks over loopback only: Ray otherwise advertises (and connects to) the machine's address;
    # read when Ray is first imported
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        from ray import serve

        from . import app as _app  # noqa: F401 - the server extra, checked here rather than in the replicas
        from .ray_serve import DEPLOYMENT_NAME, build_app
    except ImportError as e:
        hint = RAY_EXTRA_HINT if e.name and e.name.split(".")[0] == "ray" else SERVE_EXTRA_HINT
        print(f"phimm serve --ray needs Ray Serve ({e.name} is missing): {hint}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    _warn_if_open(args)
    if args.model is not None and not Path(args.model).exists():  # else each replica would fail, and be retried
        print(f"phimm serve: no checkpoint at {args.model}", file=sys.stderr)
        return 2
    ray_args = ray_args_from_args(args)
    application = build_app(ray_args)  # bad arguments fail here, before Ray starts
    # Ray's HTTP proxy turns a dead replica's requests into a retry or a clear error (phimm.serve.ray_serve);
    # Ray's processes inherit this environment
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "phimm.serve.ray_serve:proxy_middlewares")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Serve gives its HTTP proxy 5 s to report ready, three times, then kills it: on a loaded machine its start
    # (which imports phimm's proxy middleware) takes longer, and the application never starts
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    cpus = max(os.cpu_count() or 1, args.replicas * ray_args["threads_per_replica"])

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=args.log_level == "debug",
                 logging_level=args.log_level.upper())
        signal.signal(signal.SIGTERM, on_term)  # after ray.init, whose own handler would end us abruptly
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application, name=DEPLOYMENT_NAME, route_prefix="/", blocking=False)
        print(f"phimm serve --ray: {args.replicas} replica(s) x {ray_args['threads_per_replica']} thread(s) at "
              f"http://{args.host}:{args.port}/v1 (Ctrl-C stops); Ray at "
              f"{ray.get_runtime_context().gcs_address}", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except Exception as e:  # noqa: BLE001 - Ray could not start, or the replicas failed to
        print(f"phimm serve --ray: the application did not start: {type(e).__name__}: {e}", file=sys.stderr)
        try:  # the replicas' own error (a bad checkpoint, no memory), as Ray Serve recorded it
            for d in serve.status().applications[DEPLOYMENT_NAME].deployments.values():
                if d.message:
                    print(d.message.strip()[-3000:], file=sys.stderr)
        except Exception:  # noqa: BLE001 - nothing more to say
            pass
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            signal.signal(signal.SIGTERM, previous)
    return 0


def cmd_serve(args) -> int:
    if getattr(args, "ray", False):
        return cmd_serve_ray(args)
    try:
        import uvicorn

        from .app import build_app
    except ImportError as e:
        print(f"phimm serve needs the server extra ({e.name} is missing): {SERVE_EXTRA_HINT}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    _warn_if_open(args)
    app = build_app(config=config_from_args(args), loader=loader_from_args(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible server (chat completions, transcriptions) with continuous batching",
        description="Serve a model over the OpenAI API: POST /v1/chat/completions, /v1/audio/transcriptions, "
                    "GET /v1/models, /health, /metrics. Binds 127.0.0.1 unless --host is given.")
    add_arguments(p)
    p.set_defaults(func=cmd_serve)
