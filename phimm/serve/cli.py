"""`phimm serve`: the command line of the OpenAI-compatible server (this module imports no server library, so
registering the subcommand costs nothing)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
SERVE_EXTRA_HINT = "pip install 'phimm[serve]'"


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
    p.add_argument("--quantize", default=None, choices=["int8"], help="int8 weights for the base decoder")
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


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from .app import build_app
    except ImportError as e:
        print(f"phimm serve needs the server extra ({e.name} is missing): {SERVE_EXTRA_HINT}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not is_loopback(args.host) and not args.api_key:
        bar = "!" * 78
        print(f"{bar}\nWARNING: phimm serve binds {args.host} WITHOUT --api-key: anyone who can reach this "
              f"machine\ncan use the model. Pass --api-key, or bind 127.0.0.1 behind a reverse proxy.\n{bar}",
              file=sys.stderr)
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
