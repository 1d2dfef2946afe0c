"""`phimm eval asr` / `phimm eval vqa` end to end on the tiny random-weight model: the command lines, the four
outputs, an error sample not stopping the run, mixed routes in one batch, and resuming after an interruption.

The model answers random words, so the metrics are checked for shape and consistency, not for value (the values
of the metrics are checked in test_eval_metrics.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from phimm.errors import PromptError
from phimm.eval import asr, vqa
from phimm.eval.datasets import read_asr_manifest, read_vqa_jsonl
from phimm.eval.metrics import vqa_accuracy, wer
from phimm.eval.normalize import EnglishTextNormalizer
from phimm.eval.runner import ResumeError, read_predictions

OUTPUT_FIELDS = {"id", "reference", "hypothesis", "score", "route", "error"}


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def image(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)).save(path)
    return path


def asr_manifest(folder: Path, n: int = 4, missing: int | None = None) -> Path:
    """n clips at different rates and lengths; clip `missing` (1-based) names a file that does not exist."""
    rows = []
    for i in range(1, n + 1):
        rate = (8000, 16000, 22050)[i % 3]
        name = f"clip{i}.wav"
        if i != missing:
            sf.write(folder / name, tone(0.2 * i, rate, 200 + 40 * i), rate)
        rows.append({"audio": name, "text": f"utterance number {i} is twenty five words"})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def vqa_jsonl(folder: Path) -> Path:
    image(folder / "a.png", 0)
    image(folder / "b.jpg", 1)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    sf.write(folder / "question.flac", tone(0.5, 16000), 16000)
    rows = [
        {"image": "a.png", "question": "What color is it?", "answers": ["red"] * 10, "question_type": "what color"},
        {"image": "b.jpg", "audio": "question.flac", "answers": ["yes"] * 10, "question_type": "is"},
        {"image": "broken.png", "question": "How many?", "answers": ["2"] * 10, "question_type": "how many"},
        {"image": "b.jpg", "question": "Is it day?", "answers": ["yes"] * 7 + ["no"] * 3, "question_type": "is"},
    ]
    path = folder / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


class Recording:
    """The real pipeline, recording the size of each batch it is called with; `interrupt_on` makes call number
    `interrupt_on` raise KeyboardInterrupt instead (as a Ctrl-C in the middle of a run would)."""

    def __init__(self, pipe, interrupt_on: int | None = None, poison: str | None = None):
        self.pipe = pipe
        self.name = pipe.name
        self.batches: list[int] = []
        self.interrupt_on = interrupt_on
        self.poison = poison

    def __call__(self, requests, **generation):
        self.batches.append(len(requests))
        if self.interrupt_on == len(self.batches):
            raise KeyboardInterrupt
        if self.poison and any(self.poison in json.dumps(r.messages, default=str) for r in requests):
            raise PromptError("this request cannot be run")
        return self.pipe(requests, **generation)


# ---- the command lines ----------------------------------------------------------------------------------------


def test_phimm_eval_asr_command(tiny_ckpt, tmp_path, capsys):
    from phimm.cli import main

    manifest = asr_manifest(tmp_path, n=4, missing=3)
    out = tmp_path / "out"
    code = main(["eval", "asr", "--manifest", str(manifest), "--out", str(out), "--model", str(tiny_ckpt),
                 "--batch-size", "2", "--max-new-tokens", "3", "--no-progress"])
    assert code == 0
    assert "WER" in capsys.readouterr().out

    for name in ("predictions.jsonl", "summary.json", "report.md", "wer_by_duration.png"):
        assert (out / name).is_file(), name
    preds = lines(out)
    assert [p["id"] for p in preds] == [1, 2, 3, 4]  # manifest line numbers, in order
    assert all(OUTPUT_FIELDS <= p.keys() for p in preds)
    bad = preds[2]
    assert bad["hypothesis"] == "" and "clip3.wav" in bad["error"] and bad["route"] is None
    assert all(p["error"] is None and p["route"] == "speech" for p in preds if p is not bad)
    assert [p["duration"] for p in preds] == [pytest.approx(0.2), pytest.approx(0.4), None, pytest.approx(0.8)]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 4 and summary["errors"] == 1
    assert summary["model"] == str(tiny_ckpt)
    assert summary["prompt"] == "Transcribe the audio clip into text."
    assert summary["settings"]["batch_size"] == 2 and summary["settings"]["dtype"] == "float32"
    # the summary's WERs are the corpus WERs of the predictions file, the failed sample an empty transcript
    refs, hyps = [p["reference"] for p in preds], [p["hypothesis"] for p in preds]
    assert summary["wer"] == pytest.approx(wer(refs, hyps, normalizer=EnglishTextNormalizer()))
    assert summary["wer_raw"] == pytest.approx(wer(refs, hyps))
    assert 0 <= summary["cer"]
    assert summary["rtfx"] > 0 and summary["audio_s"] == pytest.approx(1.4, abs=1e-3)
    timed = [p for p in preds if p["duration"] is not None]
    bucket_wer = wer([p["reference"] for p in timed], [p["hypothesis"] for p in timed], EnglishTextNormalizer())
    assert summary["by_duration"] == [{"bucket": "0-5 s", "count": 3, "wer": pytest.approx(bucket_wer)}]

    report = (out / "report.md").read_text()
    assert "| model | data | utterances | errors | WER |" in report and "![WER by utterance duration]" in report
    with Image.open(out / "wer_by_duration.png") as png:
        assert png.format == "PNG" and png.size[0] > 400


def test_python_m_phimm_eval_vqa(tiny_ckpt, tmp_path, capsys):
    data = vqa_jsonl(tmp_path)
    out = tmp_path / "out"
    code = vqa.main(["--data", str(data), "--out", str(out), "--model", str(tiny_ckpt), "--batch-size", "4",
                     "--max-new-tokens", "3", "--no-progress"])
    assert code == 0
    assert "VQA accuracy" in capsys.readouterr().out
    for name in ("predictions.jsonl", "summary.json", "report.md", "accuracy_by_question_type.png"):
        assert (out / name).is_file(), name
    preds = lines(out)
    assert [p["id"] for p in preds] == [1, 2, 3, 4]
    assert preds[0]["reference"] == ["red"] * 10
    broken = preds[2]
    assert broken["hypothesis"] == "" and broken["score"] == 0 and "broken.png" in broken["error"]
    # a spoken question takes another route than a typed one
    assert preds[1]["spoken"] and preds[1]["route"] != preds[0]["route"]
    for p in preds:
        assert p["score"] == pytest.approx(vqa_accuracy(p["hypothesis"], p["reference"]))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 4 and summary["errors"] == 1 and summary["metric"] == "accuracy"
    assert summary["accuracy"] == pytest.approx(np.mean([p["score"] for p in preds]))
    assert 0 <= summary["exact_match"] <= 1 and 0 <= summary["anls"] <= 1
    assert summary["spoken_questions"] == 1
    assert set(summary["by_question_type"]) == {"what color", "is", "how many"}
    report = (out / "report.md").read_text()
    assert "| model | data | questions | errors | VQA accuracy | exact match | ANLS |" in report


def test_vqav2_command_with_a_missing_image(tiny_ckpt, tmp_path):
    from phimm.cli import main

    images = tmp_path / "val2014"
    images.mkdir()
    image(images / "COCO_val2014_000000000042.jpg")
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "How many dogs?", "question_id": 420},
        {"image_id": 9, "question": "What is it?", "question_id": 90},
    ]}
    annotations = {"annotations": [
        {"question_id": qid, "image_id": iid, "question_type": qt, "answer_type": at,
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate([ans] * 10)]}
        for qid, iid, qt, at, ans in [(420, 42, "how many", "number", "2"), (90, 9, "what is", "other", "dog")]
    ]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    out = tmp_path / "out"
    code = main(["eval", "vqa", "--vqav2-questions", str(tmp_path / "q.json"), "--vqav2-annotations",
                 str(tmp_path / "a.json"), "--images", str(images), "--out", str(out), "--model", str(tiny_ckpt),
                 "--max-new-tokens", "2", "--no-progress"])
    assert code == 0
    preds = lines(out)
    assert [p["id"] for p in preds] == [420, 90]  # question_id
    assert preds[0]["error"] is None and "COCO_val2014_000000000009.jpg" in preds[1]["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == 1 and set(summary["by_answer_type"]) == {"number", "other"}


def test_librispeech_and_hf_dataset_commands(tiny_ckpt, tmp_path):
    folder = tmp_path / "LibriSpeech" / "test-clean" / "61" / "70968"
    folder.mkdir(parents=True)
    for n in range(2):
        sf.write(folder / f"61-70968-000{n}.flac", tone(0.3, 16000, 300 + 50 * n), 16000)
    (folder / "61-70968.trans.txt").write_text("61-70968-0000 HE BEGAN A CONFUSED COMPLAINT\n"
                                               "61-70968-0001 GIVE NOT SO EARNEST A MIND\n")
    out = tmp_path / "ls"
    assert asr.main(["--librispeech", str(tmp_path / "LibriSpeech"), "--out", str(out), "--model", str(tiny_ckpt),
                     "--max-new-tokens", "2", "--no-progress"]) == 0
    assert [p["id"] for p in lines(out)] == ["61-70968-0000", "61-70968-0001"]

    pa = pytest.importorskip("pyarrow")
    ds = tmp_path / "hf"
    ds.mkdir()
    import io

    buf = io.BytesIO()
    sf.write(buf, tone(0.4, 24000), 24000, format="FLAC")
    table = pa.table({"speech": [{"bytes": buf.getvalue(), "path": "x.flac"}], "words": ["hello"], "id": ["x"]})
    with pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    out = tmp_path / "hf-out"
    assert asr.main(["--hf-dataset", str(ds), "--audio-column", "speech", "--text-column", "words", "--out", str(out),
                     "--model", str(tiny_ckpt), "--max-new-tokens", "2", "--no-progress"]) == 0
    (pred,) = lines(out)
    assert pred["id"] == "x" and pred["error"] is None and pred["duration"] == pytest.approx(0.4)


def test_malformed_manifest_line_exits_with_its_number(tiny_ckpt, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "a.wav", "text": "fine"}\n{"audio": "b.wav", "text": }\n', encoding="utf-8")
    code = asr.main(["--manifest", str(manifest), "--out", str(tmp_path / "out"), "--model", str(tiny_ckpt)])
    assert code == 2
    assert "line 2" in capsys.readouterr().err


def test_vqa_command_needs_a_data_source(tmp_path):
    with pytest.raises(SystemExit):
        vqa.main(["--out", str(tmp_path), "--vqav2-questions", "q.json"])


# ---- batching, errors, resuming -------------------------------------------------------------------------------


def test_mixed_routes_share_a_batch(tiny_pipe, tmp_path):
    samples = [s for s in read_vqa_jsonl(vqa_jsonl(tmp_path)).samples if "broken" not in s.image]
    pipe = Recording(tiny_pipe)
    summary = vqa.evaluate_vqa(pipe, samples, tmp_path / "out", batch_size=8, max_new_tokens=2, progress=False)
    assert pipe.batches == [3]  # one call for the typed and the spoken questions together
    routes = {p["route"] for p in lines(tmp_path / "out")}
    assert len(routes) == 2 and summary["errors"] == 0


def test_a_batch_the_pipeline_rejects_is_run_row_by_row(tiny_pipe, tmp_path):
    samples = [s for s in read_vqa_jsonl(vqa_jsonl(tmp_path)).samples if "broken" not in s.image]
    pipe = Recording(tiny_pipe, poison="What color")
    summary = vqa.evaluate_vqa(pipe, samples, tmp_path / "out", batch_size=3, max_new_tokens=2, progress=False)
    assert pipe.batches == [3, 1, 1, 1]
    preds = lines(tmp_path / "out")
    assert preds[0]["error"] == "PromptError: this request cannot be run" and preds[0]["hypothesis"] == ""
    assert preds[1]["error"] is None and preds[2]["error"] is None
    assert summary["errors"] == 1 and summary["count"] == 3


def test_resume_after_an_interruption(tiny_pipe, tmp_path):
    samples = read_asr_manifest(asr_manifest(tmp_path, n=5))
    out = tmp_path / "out"
    interrupted = Recording(tiny_pipe, interrupt_on=2)
    with pytest.raises(KeyboardInterrupt):
        asr.evaluate_asr(interrupted, samples, out, batch_size=2, max_new_tokens=2, progress=False)
    first = (out / "predictions.jsonl").read_text(encoding="utf-8")
    assert [p["id"] for p in lines(out)] == [1, 2]  # the first batch was written before the interruption
    assert not (out / "summary.json").exists()
    # a line cut short by the interruption
    with open(out / "predictions.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": 3, "reference": "utterance num')

    resumed = Recording(tiny_pipe)
    summary = asr.evaluate_asr(resumed, samples, out, batch_size=2, max_new_tokens=2, progress=False)
    assert sum(resumed.batches) == 3  # only the samples not done before
    text = (out / "predictions.jsonl").read_text(encoding="utf-8")
    assert text.startswith(first)  # nothing computed before was lost or rewritten
    assert [p["id"] for p in lines(out)] == [1, 2, 3, 4, 5]
    assert summary["count"] == 5 and summary["resumed"] == 2 and summary["errors"] == 0
    assert summary["wer"] == pytest.approx(
        wer([s.text for s in samples], [p["hypothesis"] for p in lines(out)], normalizer=EnglishTextNormalizer()))

    # run again: everything is done, nothing is sent to the model, the summary is the same
    again = Recording(tiny_pipe)
    summary_again = asr.evaluate_asr(again, samples, out, batch_size=2, max_new_tokens=2, progress=False)
    assert summary_again["wer"] == summary["wer"] and summary_again["count"] == 5
    assert again.batches == []


def test_limit_then_more(tiny_pipe, tmp_path):
    samples = read_asr_manifest(asr_manifest(tmp_path, n=4))
    out = tmp_path / "out"
    first = asr.evaluate_asr(tiny_pipe, samples, out, limit=2, max_new_tokens=2, progress=False)
    assert first["count"] == 2 and [p["id"] for p in lines(out)] == [1, 2]
    pipe = Recording(tiny_pipe)
    second = asr.evaluate_asr(pipe, samples, out, limit=3, max_new_tokens=2, progress=False)
    assert pipe.batches == [1] and second["count"] == 3 and second["resumed"] == 2


def test_resume_refuses_other_settings(tiny_pipe, tmp_path):
    samples = read_asr_manifest(asr_manifest(tmp_path, n=2))
    out = tmp_path / "out"
    asr.evaluate_asr(tiny_pipe, samples, out, limit=1, max_new_tokens=2, progress=False)
    with pytest.raises(ResumeError, match="prompt"):
        asr.evaluate_asr(tiny_pipe, samples, out, prompt="Write down what is said.", max_new_tokens=2, progress=False)
    summary = asr.evaluate_asr(tiny_pipe, samples, out, prompt="Write down what is said.", max_new_tokens=2,
                               restart=True, progress=False)
    assert summary["count"] == 2 and summary["resumed"] == 0 and len(read_predictions(out / "predictions.jsonl")) == 2


def test_bar_chart_and_markdown_table(tmp_path):
    from phimm.eval.report import bar_chart, markdown_table

    path = bar_chart(tmp_path / "wer.png", "WER by utterance duration",
                     [("0-5 s", 10, 0.05), ("5-10 s", 20, 1.7), ("10-15 s", 1, None)])
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB"))
    assert png.size == (900, 60 + 46 + 3 * 30)
    bar = np.all(pixels == (66, 114, 196), axis=-1)
    widths = [bar[60 + i * 30 + 10].sum() for i in range(3)]  # a row through the middle of each bar
    # the axis runs to 200 % (1.7 does not fit in 100 %): 1.7 / 0.05 = 34 times as long, the missing value empty
    assert widths[1] == pytest.approx(34 * widths[0], rel=0.1) and widths[2] == 0
    with Image.open(bar_chart(tmp_path / "empty.png", "nothing", [])) as png:
        assert png.size[1] > 0
    assert markdown_table(["a", "b"], [["x|y", 1]]) == "| a | b |\n|---|---|\n| x\\|y | 1 |"
