"""`phimm demo`: the subcommand that launches the web demo.

Importing this module is cheap (no gradio, no torch): `phimm run` imports it to register the subcommand, and
gradio is only imported when `phimm demo` actually runs.
"""

from __future__ import annotations

import argparse

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options (shared by `phimm demo` and `python -m demo.app`)."""
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (default: float32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per two cores)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default: {DEFAULT_HOST}, this machine only; 0.0.0.0 opens it to your "
                        "network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--share", action="store_true",
                   help="also create a public gradio.live link (off by default: anyone with the link can use it)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default answer length in tokens (default: 64)")
    p.add_argument("--max-file-mb", type=float, default=10.0, help="largest upload in MB (default: 10)")
    p.add_argument("--max-audio-s", type=float, default=60.0, help="longest audio clip in seconds (default: 60)")
    p.add_argument("--queue-size", type=int, default=32,
                   help="requests that may wait in the queue; more are turned away (default: 32)")
    p.add_argument("--examples", default=None, help="examples folder with examples.json (default: the bundled one)")


def cmd_demo(args) -> int:
    try:
        import gradio  # noqa: F401 - imported here, not when `phimm` starts
    except ImportError:
        import sys

        print("phimm demo needs gradio: pip install 'phimm[demo]'", file=sys.stderr)
        return 2
    from .app import run

    return run(args)


def register(subparsers) -> None:
    """Add `phimm demo` to the `phimm` command's subparsers."""
    p = subparsers.add_parser(
        "demo",
        help="launch the web demo (chat with image / audio upload; binds 127.0.0.1 unless --host is given)",
        description="Launch phimm's Gradio web demo on a model (default: the embedded model). It binds "
                    f"{DEFAULT_HOST} and makes no public link unless --share is given.",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_demo)
