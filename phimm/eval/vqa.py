"""`phimm eval vqa`: accuracy of a model on visual questions.

    phimm eval vqa --data questions.jsonl --out runs/vqa
    phimm eval vqa --vqav2-questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --vqav2-annotations v2_mscoco_val2014_annotations.json --images val2014 --out runs/vqav2
    phimm eval vqa --data docvqa/val_v1.0.json --images docvqa --out runs/docvqa     # scored by ANLS
    python -m phimm.eval.vqa --data questions.jsonl --out runs/vqa --limit 100

Each question is one request: the image, then the question (`--prompt` can wrap it: "{question}" stands for it,
and a prompt without it is put after the question). A spoken question (a line with "audio") is the image, the
audio, then "Answer the spoken question about the image." (`--spoken-prompt`). The summary has the VQAv2
accuracy (`accuracy`, as the official evaluation computes it), `exact_match` and `anls`, whatever the data; the
per-sample `score` and the plot use the data set's own metric: ANLS for DocVQA-style data, VQA accuracy
otherwise (`--metric` or `--anls` to choose).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from phimm.errors import PhimmError
from phimm.eval.datasets import (
    VqaDataset,
    VqaSample,
    check_image,
    load_audio,
    read_vqa_json,
    read_vqa_jsonl,
    read_vqav2,
)
from phimm.eval.metrics import anls, exact_match, vqa_accuracy, vqa_normalize_answer
from phimm.eval.runner import EvalTask, add_common_arguments, fail, load_pipeline, make_request, run_eval, run_options

__all__ = [
    "DEFAULT_PROMPT",
    "DEFAULT_SPOKEN_PROMPT",
    "METRICS",
    "VqaTask",
    "evaluate_vqa",
    "load_dataset",
    "add_arguments",
    "add_parser",
    "run",
    "main",
]

DEFAULT_PROMPT = "{question}"
DEFAULT_SPOKEN_PROMPT = "Answer the spoken question about the image."
DEFAULT_MAX_NEW_TOKENS = 64
METRICS = ("accuracy", "exact_match", "anls")


def format_question(template: str, question: str) -> str:
    """The text of a question's turn: `template` with "{question}" replaced, or the question then the template."""
    if "{question}" in template:
        return template.replace("{question}", question)
    return f"{question}\n{template}" if template.strip() else question


class VqaTask(EvalTask):
    """Visual question answering: a request per question, scored by VQAv2 accuracy, exact match and ANLS."""

    name = "vqa"

    def __init__(self, prompt: str = DEFAULT_PROMPT, spoken_prompt: str = DEFAULT_SPOKEN_PROMPT,
                 metric: str = "accuracy", revision: int = 2016, normalize_references: bool = False):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
        self.normalize_references = normalize_references
        self.prompt = prompt
        self.spoken_prompt = spoken_prompt
        self.metric = metric
        self.revision = revision
        self.reset()

    def prepare(self, sample: VqaSample) -> tuple[Any, dict]:
        content: list[dict] = [{"type": "image", "image": check_image(sample)}]
        if sample.audio is not None:
            audio, _ = load_audio(sample.audio)
            content += [{"type": "audio", "audio": audio}, {"type": "text", "text": self.spoken_prompt}]
        else:
            content.append({"type": "text", "text": format_question(self.prompt, sample.question)})
        return make_request(content), {}

    def scores(self, hypothesis: str, answers: list[str]) -> dict[str, float]:
        if self.normalize_references:
            # the official annotation files hold answers already normalised ("3", not "three"); answers written
            # by hand get the same normalisation here, or "three" could never match the normalised prediction
            answers = [vqa_normalize_answer(a) for a in answers]
        return {
            "accuracy": vqa_accuracy(hypothesis, answers, revision=self.revision),
            "exact_match": exact_match(hypothesis, answers),
            "anls": anls(hypothesis, answers),
        }

    def record(self, sample: VqaSample, hypothesis: str, route: str | None, error: str | None, extra: dict) -> dict:
        scores = self.scores(hypothesis, sample.answers)
        return {
            "id": sample.id,
            "reference": list(sample.answers),
            "hypothesis": hypothesis,
            "score": round(scores[self.metric], 6),
            "route": route,
            "error": error,
            "question": sample.question,
            "spoken": sample.audio is not None,
            "question_type": sample.question_type,
            "answer_type": sample.answer_type,
            **{k: round(v, 6) for k, v in scores.items()},
            "inference_s": round(extra.get("inference_s", 0.0), 6),
        }

    def reset(self) -> None:
        self._total = 0.0
        self._count = 0

    def update(self, record: dict) -> None:
        self._total += float(record["score"])
        self._count += 1

    def postfix(self) -> str:
        return f"{self.metric} {100 * self._total / max(self._count, 1):.2f}%"

    def summarize(self, records: list[dict]) -> dict:
        totals = {m: 0.0 for m in METRICS}
        by_type: dict[str, list[float]] = {}
        by_answer_type: dict[str, list[float]] = {}
        inference_s = 0.0
        for r in records:
            scores = self.scores(r["hypothesis"], r["reference"])
            for m in METRICS:
                totals[m] += scores[m]
            by_type.setdefault(r.get("question_type") or "all", []).append(scores[self.metric])
            if r.get("answer_type"):
                by_answer_type.setdefault(r["answer_type"], []).append(scores[self.metric])
            inference_s += float(r.get("inference_s") or 0.0)
        n = len(records)

        def groups(d: dict[str, list[float]]) -> dict[str, dict]:
            ordered = sorted(d.items(), key=lambda kv: (-len(kv[1]), kv[0]))
            return {k: {"count": len(v), self.metric: sum(v) / len(v)} for k, v in ordered}

        return {
            "metric": self.metric,
            "score": totals[self.metric] / n if n else None,
            **{m: (totals[m] / n if n else None) for m in METRICS},
            "vqa_revision": self.revision,
            "spoken_prompt": self.spoken_prompt,
            "spoken_questions": sum(1 for r in records if r.get("spoken")),
            "model_inference_s": round(inference_s, 3),
            "by_question_type": groups(by_type),
            "by_answer_type": groups(by_answer_type),
        }

    def breakdown(self, summary: dict) -> tuple[str, list[tuple[str, int, float]]]:
        rows = [(k, v["count"], v[self.metric]) for k, v in summary.get("by_question_type", {}).items()]
        return f"{_METRIC_NAMES[self.metric]} by question type", rows

    def plot_name(self) -> str:
        return f"{self.metric}_by_question_type.png"


_METRIC_NAMES = {"accuracy": "VQA accuracy", "exact_match": "Exact match", "anls": "ANLS"}


def evaluate_vqa(
    pipe: Any,
    samples: Sequence[VqaSample],
    out_dir: str,
    *,
    prompt: str = DEFAULT_PROMPT,
    spoken_prompt: str = DEFAULT_SPOKEN_PROMPT,
    metric: str = "accuracy",
    revision: int = 2016,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    normalize_references: bool = False,
    **options,
) -> dict:
    """Answers `samples` with `pipe` and writes predictions.jsonl, summary.json, report.md and
    `<metric>_by_question_type.png` to `out_dir`; returns the summary (`accuracy`, `exact_match`, `anls`, ...).

    `options`: `run_eval`'s (`batch_size`, `limit`, `model`, `data`, `settings`, `restart`, `progress`)."""
    task = VqaTask(prompt, spoken_prompt, metric, revision, normalize_references)
    return run_eval(pipe, task, samples, out_dir, max_new_tokens=max_new_tokens, **options)


def load_dataset(args: argparse.Namespace) -> VqaDataset:
    """The questions the command line names."""
    if args.data:
        if args.data.lower().endswith(".json"):
            return read_vqa_json(args.data, images=args.images)
        return read_vqa_jsonl(args.data)
    return read_vqav2(args.vqav2_questions, args.vqav2_annotations, args.images)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `phimm eval vqa`."""
    data = parser.add_argument_group("data (--data, or the three --vqav2-questions, --vqav2-annotations, --images)")
    data.add_argument("--data", metavar="FILE",
                      help='JSON lines {"image": path, "question": ..., "answers": [...]} (optional "audio", '
                           '"id", "question_type"), or a DocVQA/TextVQA .json file')
    data.add_argument("--vqav2-questions", metavar="FILE", help="the official VQAv2 questions file")
    data.add_argument("--vqav2-annotations", metavar="FILE", help="the official VQAv2 annotations file")
    data.add_argument("--images", metavar="DIR",
                      help="the COCO images of --vqav2-questions (COCO_<split>_<image_id:012d>.jpg); for a "
                           ".json --data, the folder its image paths are relative to")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help='the question\'s text; "{question}" stands for the question, and a prompt without it '
                             'is put after the question (default "{question}")')
    parser.add_argument("--spoken-prompt", default=DEFAULT_SPOKEN_PROMPT,
                        help=f'the text after a spoken question\'s audio ("{DEFAULT_SPOKEN_PROMPT}")')
    parser.add_argument("--metric", choices=("auto",) + METRICS, default="auto",
                        help="the per-sample score and the plot's metric (auto: anls for DocVQA-style data, "
                             "else accuracy); the summary has all three")
    parser.add_argument("--anls", dest="metric", action="store_const", const="anls", help="same as --metric anls")
    parser.add_argument("--raw-references", action="store_true",
                        help="with --data: score against the answers as written (default: normalised as the "
                             "official annotation files are, e.g. 'three' -> '3')")
    parser.add_argument("--vqa-revision", type=int, choices=(2016, 2021), default=2016,
                        help="the official evaluation's revision (2016: the VQAv2 challenges' server; 2021: the "
                             "VQA API's last change, which normalises only where the humans disagree)")
    add_common_arguments(parser, DEFAULT_MAX_NEW_TOKENS)


def _check_sources(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    vqav2 = [args.vqav2_questions, args.vqav2_annotations]
    if args.data and any(vqav2):
        parser.error("--data and --vqav2-questions/--vqav2-annotations exclude each other")
    if not args.data and not all(vqav2 + [args.images]):
        parser.error("give --data FILE, or all of --vqav2-questions, --vqav2-annotations and --images")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `vqa` to an `eval` command's subparsers."""
    parser = subparsers.add_parser(
        "vqa", help="VQAv2 accuracy, exact match and ANLS on visual questions",
        description="VQAv2 accuracy (the official evaluation), exact match and ANLS of a model on visual "
                    "questions.",
    )
    add_arguments(parser)
    parser.set_defaults(func=lambda args: run(args, parser))
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Runs `phimm eval vqa` with parsed arguments; returns the exit code."""
    prog = "phimm eval vqa"
    if parser is not None:
        _check_sources(parser, args)
    elif not args.data and not (args.vqav2_questions and args.vqav2_annotations and args.images):
        return fail(prog, "give --data FILE, or all of --vqav2-questions, --vqav2-annotations and --images")
    try:
        dataset = load_dataset(args)
        metric = dataset.metric if args.metric == "auto" else args.metric
        pipe = load_pipeline(args)
        summary = evaluate_vqa(pipe, dataset.samples, args.out, prompt=args.prompt, spoken_prompt=args.spoken_prompt,
                               metric=metric, revision=args.vqa_revision,
                               normalize_references=bool(args.data) and not args.raw_references,
                               **run_options(args, pipe, dataset.source))
    except PhimmError as e:  # DatasetError, ResumeError, a model that cannot be loaded
        return fail(prog, e)

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    print(f"VQA accuracy {pct(summary['accuracy'])}, exact match {pct(summary['exact_match'])}, "
          f"ANLS {pct(summary['anls'])} on {summary['count']} questions ({summary['errors']} errors) -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m phimm.eval.vqa ...`"""
    parser = argparse.ArgumentParser(
        prog="python -m phimm.eval.vqa",
        description="VQAv2 accuracy (the official evaluation), exact match and ANLS of a model on visual questions.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
