"""`phimm eval asr`: word error rate of a model on a speech data set.

    phimm eval asr --manifest test.jsonl --out runs/asr
    phimm eval asr --librispeech LibriSpeech/test-clean --out runs/ls-clean --model path/to/model
    phimm eval asr --hf-dataset data/librispeech_test --audio-column audio --text-column text --out runs/hf
    python -m phimm.eval.asr --manifest test.jsonl --out runs/asr --limit 100 --batch-size 16

Each utterance is one request: the audio, then the prompt ("Transcribe the audio clip into text.", the reference
model's, unless `--prompt` says otherwise). The summary has the corpus WER and CER after Whisper's own English
normaliser (`EnglishTextNormalizer`, from the package whisper-normalizer, as published WERs are; `wer`, `cer`),
the same without normalisation (`wer_raw`, `cer_raw`), and the real-time factor `rtfx` (seconds
of audio transcribed per second of inference). A sample that fails counts as an empty transcript.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

from phimm.errors import PhimmError
from phimm.eval.datasets import (
    AsrSample,
    load_audio,
    read_asr_manifest,
    read_hf_audio_dataset,
    read_librispeech,
)
from phimm.eval.metrics import ErrorCounts, char_errors, word_errors
from phimm.eval.normalize import EnglishTextNormalizer
from phimm.eval.runner import EvalTask, add_common_arguments, fail, load_pipeline, make_request, run_eval, run_options

__all__ = [
    "DEFAULT_PROMPT",
    "DURATION_BUCKETS",
    "AsrTask",
    "evaluate_asr",
    "load_samples",
    "add_arguments",
    "add_parser",
    "run",
    "main",
]

DEFAULT_PROMPT = "Transcribe the audio clip into text."
DEFAULT_MAX_NEW_TOKENS = 256
# utterance durations (seconds) the report breaks the WER down by
DURATION_BUCKETS: tuple[tuple[float, float], ...] = ((0, 5), (5, 10), (10, 15), (15, 20), (20, 30), (30, math.inf))


def _bucket_label(lo: float, hi: float) -> str:
    return f">= {lo:g} s" if math.isinf(hi) else f"{lo:g}-{hi:g} s"


class AsrTask(EvalTask):
    """Speech recognition: a request per utterance, scored by word error rate."""

    name = "asr"

    def __init__(self, prompt: str = DEFAULT_PROMPT, normalizer=None):
        self.prompt = prompt
        self.normalizer = normalizer if normalizer is not None else EnglishTextNormalizer()
        self.reset()

    def prepare(self, sample: AsrSample) -> tuple[Any, dict]:
        audio, duration = load_audio(sample.audio)
        content = [{"type": "audio", "audio": audio}, {"type": "text", "text": self.prompt}]
        return make_request(content), {"duration": round(duration, 4)}

    def record(self, sample: AsrSample, hypothesis: str, route: str | None, error: str | None, extra: dict) -> dict:
        reference_n = self.normalizer(sample.text)
        hypothesis_n = self.normalizer(hypothesis)
        counts = word_errors(reference_n, hypothesis_n)
        return {
            "id": sample.id,
            "reference": sample.text,
            "hypothesis": hypothesis,
            "score": round(counts.rate, 6),
            "route": route,
            "error": error,
            "duration": extra.get("duration"),
            "inference_s": round(extra.get("inference_s", 0.0), 6),
            "reference_normalized": reference_n,
            "hypothesis_normalized": hypothesis_n,
            "word_errors": counts.errors,
            "reference_words": counts.reference_length,
        }

    def reset(self) -> None:
        self._errors = 0
        self._words = 0

    def update(self, record: dict) -> None:
        if "word_errors" in record and "reference_words" in record:
            self._errors += int(record["word_errors"])
            self._words += int(record["reference_words"])
        else:
            counts = word_errors(self.normalizer(record["reference"]), self.normalizer(record["hypothesis"]))
            self._errors += counts.errors
            self._words += counts.reference_length

    def postfix(self) -> str:
        return f"WER {100 * self._errors / max(self._words, 1):.2f}%"

    def summarize(self, records: list[dict]) -> dict:
        words, chars, words_raw, chars_raw = ErrorCounts(), ErrorCounts(), ErrorCounts(), ErrorCounts()
        buckets = {b: ErrorCounts() for b in DURATION_BUCKETS}
        bucket_counts = {b: 0 for b in DURATION_BUCKETS}
        audio_s = inference_s = 0.0
        for r in records:
            ref, hyp = r["reference"], r["hypothesis"]
            ref_n, hyp_n = self.normalizer(ref), self.normalizer(hyp)
            w = word_errors(ref_n, hyp_n)
            words = words + w
            chars = chars + char_errors(ref_n, hyp_n)
            words_raw = words_raw + word_errors(ref, hyp)
            chars_raw = chars_raw + char_errors(ref, hyp)
            inference_s += float(r.get("inference_s") or 0.0)
            duration = r.get("duration")
            if duration is not None:
                if not r.get("error"):
                    audio_s += float(duration)
                for lo, hi in DURATION_BUCKETS:
                    if lo <= duration < hi:
                        buckets[(lo, hi)] = buckets[(lo, hi)] + w
                        bucket_counts[(lo, hi)] += 1
                        break
        return {
            "wer": words.rate if records else None,
            "cer": chars.rate if records else None,
            "wer_raw": words_raw.rate if records else None,
            "cer_raw": chars_raw.rate if records else None,
            "rtfx": round(audio_s / inference_s, 3) if inference_s > 0 else None,
            "audio_s": round(audio_s, 3),
            "model_inference_s": round(inference_s, 3),
            "word_errors": {"substitutions": words.substitutions, "deletions": words.deletions,
                            "insertions": words.insertions, "reference_words": words.reference_length},
            "normalizer": type(self.normalizer).__name__,
            "by_duration": [
                {"bucket": _bucket_label(lo, hi), "count": bucket_counts[(lo, hi)], "wer": buckets[(lo, hi)].rate}
                for lo, hi in DURATION_BUCKETS
                if bucket_counts[(lo, hi)]
            ],
        }

    def breakdown(self, summary: dict) -> tuple[str, list[tuple[str, int, float]]]:
        rows = [(b["bucket"], b["count"], b["wer"]) for b in summary.get("by_duration", [])]
        return "WER by utterance duration", rows

    def plot_name(self) -> str:
        return "wer_by_duration.png"


def evaluate_asr(
    pipe: Any,
    samples: Sequence[AsrSample],
    out_dir: str,
    *,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    **options,
) -> dict:
    """Transcribes `samples` with `pipe` and writes predictions.jsonl, summary.json, report.md and
    wer_by_duration.png to `out_dir`; returns the summary (`wer`, `cer`, `wer_raw`, `rtfx`, `count`, ...).

    `options`: `run_eval`'s (`batch_size`, `limit`, `model`, `data`, `settings`, `restart`, `progress`)."""
    return run_eval(pipe, AsrTask(prompt), samples, out_dir, max_new_tokens=max_new_tokens, **options)


def load_samples(args: argparse.Namespace) -> tuple[list[AsrSample], str]:
    """The utterances the command line names, and a description of the data for the summary."""
    if args.manifest:
        return read_asr_manifest(args.manifest), f"manifest:{args.manifest}"
    if args.librispeech:
        return read_librispeech(args.librispeech), f"librispeech:{args.librispeech}"
    samples = read_hf_audio_dataset(args.hf_dataset, audio_column=args.audio_column, text_column=args.text_column,
                                    split=args.split)
    return samples, f"hf-dataset:{args.hf_dataset}" + (f":{args.split}" if args.split else "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `phimm eval asr`."""
    data = parser.add_argument_group("data (one of)")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", metavar="FILE",
                        help='JSON lines {"audio": path, "text": ...}; paths relative to the manifest')
    source.add_argument("--librispeech", metavar="DIR", help="a LibriSpeech tree (*/*/*.trans.txt beside .flac files)")
    source.add_argument("--hf-dataset", metavar="DIR", help="a Hugging Face datasets folder written by save_to_disk")
    data.add_argument("--audio-column", default="audio", metavar="C", help="--hf-dataset's audio column (audio)")
    data.add_argument("--text-column", default=None, metavar="C",
                      help="--hf-dataset's text column (default: text, sentence, transcription, ...)")
    data.add_argument("--split", default=None, help="--hf-dataset's split, for a DatasetDict folder")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f'the text after the audio ("{DEFAULT_PROMPT}")')
    add_common_arguments(parser, DEFAULT_MAX_NEW_TOKENS)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `asr` to an `eval` command's subparsers."""
    parser = subparsers.add_parser(
        "asr", help="word error rate on a speech data set",
        description="Word error rate (after Whisper's English normaliser, and raw), CER and RTFx of a model on a "
                    "speech data set.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs `phimm eval asr` with parsed arguments; returns the exit code."""
    prog = "phimm eval asr"
    try:
        samples, data = load_samples(args)
        pipe = load_pipeline(args)
        summary = evaluate_asr(pipe, samples, args.out, prompt=args.prompt, **run_options(args, pipe, data))
    except PhimmError as e:  # DatasetError, ResumeError, a model that cannot be loaded
        return fail(prog, e)
    print(_one_line(summary, args.out))
    return 0


def _one_line(summary: dict, out: str) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    rtfx = summary.get("rtfx")
    return (f"WER {pct(summary['wer'])} (raw {pct(summary['wer_raw'])}), CER {pct(summary['cer'])}, "
            f"RTFx {rtfx if rtfx is not None else 'n/a'} on {summary['count']} utterances "
            f"({summary['errors']} errors) -> {out}")


def main(argv: list[str] | None = None) -> int:
    """`python -m phimm.eval.asr ...`"""
    parser = argparse.ArgumentParser(
        prog="python -m phimm.eval.asr",
        description="Word error rate (after Whisper's English normaliser, and raw), CER and RTFx of a model on speech.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
