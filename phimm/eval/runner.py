"""The evaluation loop shared by `phimm eval asr` and `phimm eval vqa`.

`run_eval(pipe, task, samples, out_dir)` sends the samples through the pipeline `--batch-size` at a time (one
batched call, so rows with different routes share a batch), and after every batch appends one line per sample to
`predictions.jsonl` and flushes it, so an interrupted run loses at most the batch in flight. Started again on the
same folder, it reads the lines already there and skips their ids; the summary covers them all.

A sample whose media cannot be read, or whose row the pipeline rejects, gets a line with `hypothesis: ""`,
its score for that empty answer, and `error`; the run goes on, and `summary["errors"]` counts them.

`pipe` is anything callable as `pipe(list_of_requests, max_new_tokens=N) -> list_of_outputs` whose outputs have
`.text`, `.route` and `.error`, as `phimm.load()` returns; `task` knows how to make a request of a sample and how
to score and summarise (`phimm.eval.asr.AsrTask`, `phimm.eval.vqa.VqaTask`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phimm.errors import PhimmError

__all__ = [
    "EvalTask",
    "ResumeError",
    "run_eval",
    "read_predictions",
    "make_request",
    "add_common_arguments",
    "load_pipeline",
    "run_options",
    "PREDICTIONS",
    "SUMMARY",
    "REPORT",
    "RUN_INFO",
]

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
REPORT = "report.md"
RUN_INFO = "run.json"

# settings that must not change between an interrupted run and its resumption
_RESUME_KEYS = ("task", "model", "prompt", "data", "max_new_tokens", "dtype")


class ResumeError(PhimmError, ValueError):
    """`--out` holds predictions of a run with other settings (another model, prompt or data set)."""


class EvalTask:
    """What a kind of evaluation does with a sample; `run_eval` does the rest.

    Subclasses set `name` and `prompt` and implement `prepare`, `record`, `postfix`, `summarize` and
    `write_plot`.
    """

    name = "eval"
    prompt = ""

    def sample_id(self, sample: Any) -> int | str:
        return sample.id

    def prepare(self, sample: Any) -> tuple[Any, dict]:
        """The request for a sample and extra fields for its line; raises `PhimmError` (a `MediaError`) when the
        sample's media cannot be read."""
        raise NotImplementedError

    def record(self, sample: Any, hypothesis: str, route: str | None, error: str | None, extra: dict) -> dict:
        """The predictions line of a sample (`id`, `reference`, `hypothesis`, `score`, `route`, `error`, ...)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Clears the running metric."""

    def update(self, record: dict) -> None:
        """Adds a line to the running metric."""

    def postfix(self) -> str:
        """The running metric, for the progress bar."""
        return ""

    def summarize(self, records: list[dict]) -> dict:
        """The metrics of the lines, for summary.json."""
        raise NotImplementedError

    def breakdown(self, summary: dict) -> tuple[str, list[tuple[str, int, float]]]:
        """(title, rows of label, count, value) for the report and the plot."""
        return "", []

    def plot_name(self) -> str:
        return "plot.png"


def make_request(content: list[dict]) -> Any:
    """A `phimm.Request` with one user turn of the given content parts."""
    try:
        from phimm import Request
    except ImportError:
        from phimm.types import Request
    return Request(messages=[{"role": "user", "content": content}])


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """The lines of a predictions file. A last line cut short by an interruption is dropped, and cut off the
    file too, so that the next line appended starts on a line of its own."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a partial last line
        with open(path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    records = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ResumeError(f"{path}, line {number}: not valid JSON; move the file away to start over") from None
        if isinstance(record, dict) and "id" in record:
            records.append(record)
    return records


def _check_resume(out_dir: Path, info: dict, restart: bool) -> None:
    info_path = out_dir / RUN_INFO
    predictions = out_dir / PREDICTIONS
    if restart:
        for name in (PREDICTIONS, SUMMARY, REPORT, RUN_INFO):
            (out_dir / name).unlink(missing_ok=True)
    elif predictions.is_file() and info_path.is_file():
        try:
            before = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            before = {}
        changed = [k for k in _RESUME_KEYS if k in before and before.get(k) != info.get(k)]
        if changed:
            diffs = "; ".join(f"{k}: {before.get(k)!r} then, {info.get(k)!r} now" for k in changed)
            raise ResumeError(
                f"{out_dir} holds predictions of another run ({diffs}): use another --out, or --restart to "
                "start over"
            )
    info_path.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _route_name(route: Any) -> str | None:
    return None if route is None else str(route)


def _run_batch(pipe, requests: list, max_new_tokens: int) -> list[tuple[str, str | None, str | None]]:
    """(text, route, error) per request. A batch the pipeline rejects as a whole is run again row by row, to
    find the rows at fault."""
    try:
        outputs = pipe(requests, max_new_tokens=max_new_tokens)
    except PhimmError as e:
        if len(requests) == 1:
            return [("", None, f"{type(e).__name__}: {e}")]
        return [result for request in requests for result in _run_batch(pipe, [request], max_new_tokens)]
    if len(outputs) != len(requests):
        raise RuntimeError(f"the pipeline returned {len(outputs)} outputs for {len(requests)} requests")
    results = []
    for out in outputs:
        error = getattr(out, "error", None)
        if error is not None:
            results.append(("", _route_name(getattr(out, "route", None)), f"{type(error).__name__}: {error}"))
        else:
            results.append(((out.text or "").strip(), _route_name(getattr(out, "route", None)), None))
    return results


def run_eval(
    pipe: Any,
    task: EvalTask,
    samples: Sequence[Any],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    max_new_tokens: int = 64,
    model: str | None = None,
    data: str = "",
    settings: dict | None = None,
    restart: bool = False,
    progress: bool = True,
) -> dict:
    """Runs `samples` (the first `limit`) through `pipe`, writes the outputs to `out_dir` and returns the summary.

    Outputs: `predictions.jsonl` (one line per sample), `summary.json`, `report.md` and the task's plot; and
    `run.json`, the settings, to refuse resuming with other ones.
    """
    from phimm.eval.report import write_outputs

    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    started = time.perf_counter()
    samples = list(samples)[:limit] if limit is not None else list(samples)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_name = model if model is not None else str(getattr(pipe, "name", type(pipe).__name__))
    settings = dict(settings or {})
    settings.update(batch_size=batch_size, limit=limit, max_new_tokens=max_new_tokens)
    info = {"task": task.name, "model": model_name, "prompt": task.prompt, "data": data,
            "max_new_tokens": max_new_tokens, "dtype": settings.get("dtype")}
    _check_resume(out_dir, info, restart)

    wanted = {str(task.sample_id(s)) for s in samples}
    done: dict[str, dict] = {}
    for record in read_predictions(out_dir / PREDICTIONS):
        key = str(record["id"])
        if key in wanted:
            done[key] = record
    pending = [s for s in samples if str(task.sample_id(s)) not in done]

    task.reset()
    for record in done.values():
        task.update(record)
    bar = _progress_bar(len(samples), len(done), task.name, progress)
    if done:
        bar.set_postfix_str(task.postfix(), refresh=False)
    inference_s = 0.0
    with open(out_dir / PREDICTIONS, "a", encoding="utf-8") as f:
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            lines: list[dict | None] = [None] * len(batch)
            requests, rows, extras = [], [], {}
            for i, sample in enumerate(batch):
                try:
                    request, extra = task.prepare(sample)
                except PhimmError as e:
                    lines[i] = task.record(sample, "", None, f"{type(e).__name__}: {e}", {"inference_s": 0.0})
                    continue
                requests.append(request)
                rows.append(i)
                extras[i] = extra
            if requests:
                t0 = time.perf_counter()
                results = _run_batch(pipe, requests, max_new_tokens)
                elapsed = time.perf_counter() - t0
                inference_s += elapsed
                for i, (text, route, error) in zip(rows, results):
                    extra = dict(extras[i], inference_s=elapsed / len(requests))
                    lines[i] = task.record(batch[i], text, route, error, extra)
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                done[str(line["id"])] = line
                task.update(line)
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
            bar.set_postfix_str(task.postfix())
    bar.close()

    records = [done[str(task.sample_id(s))] for s in samples if str(task.sample_id(s)) in done]
    summary = {"task": task.name}
    summary.update(task.summarize(records))
    summary.update(
        count=len(records),
        errors=sum(1 for r in records if r.get("error")),
        model=model_name,
        prompt=task.prompt,
        data=data,
        settings=settings,
        resumed=len(records) - len(pending),
        inference_s=round(inference_s, 3),
        wall_time_s=round(time.perf_counter() - started, 3),
    )
    write_outputs(out_dir, task, summary, records)
    return summary


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="sample", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------------------
# command-line pieces shared by asr and vqa
# --------------------------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """Options every `phimm eval` command has: --out, --model, --batch-size, --limit, --max-new-tokens, ..."""
    run = parser.add_argument_group("running")
    run.add_argument("--out", required=True, metavar="DIR",
                     help="folder for predictions.jsonl, summary.json, report.md and the plot; a folder with "
                          "predictions of an interrupted run resumes it")
    run.add_argument("--model", metavar="PATH", default=None,
                     help="any model phimm.load accepts (default: the embedded model)")
    run.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="requests per batch (8)")
    run.add_argument("--limit", type=_non_negative_int, default=None, metavar="N", help="the first N samples only")
    run.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens, metavar="N",
                     help=f"tokens generated at most per sample ({max_new_tokens})")
    run.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                     help="weights' dtype (float32)")
    run.add_argument("--device", default="cpu", help="torch device (cpu)")
    run.add_argument("--restart", action="store_true",
                     help="discard predictions already in --out instead of resuming")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def load_pipeline(args: argparse.Namespace) -> Any:
    """The pipeline the command line asks for: `phimm.load(args.model, device=args.device, dtype=args.dtype)`."""
    import phimm

    return phimm.load(args.model, device=args.device, dtype=args.dtype)


def model_name(pipe: Any, args: argparse.Namespace) -> str:
    name = getattr(pipe, "name", None)
    return str(name) if name else (args.model or "embedded")


def run_options(args: argparse.Namespace, pipe: Any, data: str) -> dict:
    """`run_eval`'s keyword arguments from the common command-line options."""
    return {
        "batch_size": args.batch_size,
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
        "model": model_name(pipe, args),
        "data": data,
        "settings": {"dtype": args.dtype, "device": args.device},
        "restart": args.restart,
        "progress": not args.no_progress,
    }


def fail(prog: str, error: BaseException) -> int:
    """Prints an error the way argparse does and returns the exit code 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2
