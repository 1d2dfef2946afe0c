"""`phimm eval`: ASR and VQA evaluation with the standard metrics, on data sets as people have them on disk.

    phimm eval asr --manifest test.jsonl --out runs/asr        # WER, CER, raw WER, RTFx
    phimm eval vqa --data questions.jsonl --out runs/vqa       # VQAv2 accuracy, exact match, ANLS

The pieces are importable on their own: `EnglishTextNormalizer`, the metrics (`wer`, `cer`, `vqa_accuracy`,
`exact_match`, `anls`), the readers (`read_asr_manifest`, `read_librispeech`, `read_hf_audio_dataset`,
`read_vqa_jsonl`, `read_vqa_json`, `read_vqav2`) and the runners (`evaluate_asr`, `evaluate_vqa`), which take
any pipeline callable on a list of `phimm.Request`.

To hook the commands into a CLI: `phimm.eval.register(subparsers)` adds `eval` (with `asr` and `vqa`), each
parser with `func` set to a function of the parsed arguments that returns the exit code.
"""

from __future__ import annotations

import argparse

from phimm.eval.datasets import (
    AsrSample,
    DatasetError,
    VqaDataset,
    VqaSample,
    read_asr_manifest,
    read_hf_audio_dataset,
    read_librispeech,
    read_vqa_json,
    read_vqa_jsonl,
    read_vqav2,
)
from phimm.eval.metrics import ErrorCounts, anls, cer, exact_match, vqa_accuracy, vqa_normalize_answer, wer
from phimm.eval.normalize import EnglishNumberNormalizer, EnglishSpellingNormalizer, EnglishTextNormalizer
from phimm.eval.runner import ResumeError, run_eval

__all__ = [
    "register",
    "DatasetError",
    "ResumeError",
    "EnglishTextNormalizer",
    "EnglishNumberNormalizer",
    "EnglishSpellingNormalizer",
    "ErrorCounts",
    "wer",
    "cer",
    "vqa_accuracy",
    "vqa_normalize_answer",
    "exact_match",
    "anls",
    "AsrSample",
    "VqaSample",
    "VqaDataset",
    "read_asr_manifest",
    "read_librispeech",
    "read_hf_audio_dataset",
    "read_vqa_jsonl",
    "read_vqa_json",
    "read_vqav2",
    "run_eval",
    "evaluate_asr",
    "evaluate_vqa",
]


def evaluate_asr(*args, **kwargs):
    """See `phimm.eval.asr.evaluate_asr`."""
    from phimm.eval.asr import evaluate_asr as _evaluate_asr

    return _evaluate_asr(*args, **kwargs)


def evaluate_vqa(*args, **kwargs):
    """See `phimm.eval.vqa.evaluate_vqa`."""
    from phimm.eval.vqa import evaluate_vqa as _evaluate_vqa

    return _evaluate_vqa(*args, **kwargs)


def _add_tasks(parser: argparse.ArgumentParser) -> None:
    from phimm.eval import asr, vqa

    tasks = parser.add_subparsers(dest="eval_task", metavar="{asr,vqa}", required=True)
    asr.add_parser(tasks)
    vqa.add_parser(tasks)


_DESCRIPTION = "Evaluate a model: `asr` (WER, CER, RTFx) or `vqa` (VQAv2 accuracy, exact match, ANLS)."


def register(subparsers) -> argparse.ArgumentParser:
    """Adds the `eval` command, with `asr` and `vqa` under it, to a CLI's subparsers; returns the `eval` parser.

    Each of `asr` and `vqa` sets `func`: call `args.func(args)` for the exit code.
    """
    parser = subparsers.add_parser(
        "eval", help="measure a model: WER on speech, accuracy on visual questions", description=_DESCRIPTION
    )
    _add_tasks(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m phimm.eval asr|vqa ...`"""
    parser = argparse.ArgumentParser(prog="python -m phimm.eval", description=_DESCRIPTION)
    _add_tasks(parser)
    args = parser.parse_args(argv)
    return args.func(args)
