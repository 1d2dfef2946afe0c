"""The `phimm` command: `phimm run`, `phimm eval`, `phimm serve`, `phimm bench`, `phimm train`, and the
subcommands other packages add through the `phimm.commands` entry points (`phimm demo`, from `demo.cli`)."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from .errors import PhimmError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per two cores)")


def build_request(prompt: str, images=(), audios=(), *, raw: bool = False, adapter: str | None = None):
    """A chat request: the media, then the prompt, in one user turn (or the prompt verbatim with raw=True)."""
    from routers import AudioProjector, Route

    from .types import Request

    forced = None
    if adapter is not None:
        proj = (AudioProjector.VISION_SPEECH if images else AudioProjector.SPEECH) if audios else None
        forced = Route(None, proj) if adapter == "none" else adapter
    if raw:
        return Request(prompt=prompt, images=list(images), audios=list(audios), adapter=forced)
    parts = [{"type": "image", "image": i} for i in images] + [{"type": "audio", "audio": a} for a in audios]
    if prompt:
        parts.append({"type": "text", "text": prompt})
    return Request(messages=[{"role": "user", "content": parts}], adapter=forced)


def cmd_run(args) -> int:
    import phimm

    pipe = phimm.load(args.model, dtype=args.dtype, threads=args.threads)
    req = build_request(args.prompt, args.image or [], args.audio or [], raw=args.raw, adapter=args.adapter)
    gen = {"max_new_tokens": args.max_new_tokens}
    if args.temperature is not None:
        gen.update(do_sample=True, temperature=args.temperature)
    if args.stream:
        stream = pipe.stream(req, **gen)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        print(f"[route: {stream.route}]", file=sys.stderr)
        return 0
    out = pipe(req, **gen)
    print(out.text)
    speed = f", {out.tokens_per_s:.1f} tok/s" if out.tokens_per_s else ""
    print(f"[route: {out.route} | ttft {out.ttft_s:.3f} s{speed}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phimm", description="Multimodal mixture-of-LoRAs runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer one prompt (with optional image / audio) and print the route taken")
    _add_model_args(run)
    run.add_argument("--image", action="append", help="an image file (repeatable)")
    run.add_argument("--audio", action="append", help="an audio file (repeatable)")
    run.add_argument("--adapter", default=None, help="force an adapter by name ('none' for the base model)")
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy)")
    run.add_argument("--raw", action="store_true", help="use the prompt verbatim instead of a chat turn")
    run.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    run.add_argument("prompt")
    run.set_defaults(func=cmd_run)

    from . import bench, bench_serve, eval as eval_cmd, router_training, train
    from .serve import cli as serve_cli

    eval_cmd.register(sub)
    serve_cli.register(sub)
    bench_parser = bench.register(sub)
    bench_serve.register(bench_parser.add_subparsers(
        dest="mode", metavar="[serve]", help="optional: 'serve' benchmarks continuous batching over HTTP"))
    train.register(sub)
    router_training.register(sub)
    for ep in entry_points(group="phimm.commands"):  # other packages' subcommands: `phimm demo` (demo.cli)
        ep.load()(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PhimmError as e:
        print(f"phimm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
