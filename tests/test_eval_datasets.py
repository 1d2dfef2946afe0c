"""The readers of `phimm eval`: each input layout, built in the test (audio generated in code), and the errors a
malformed input gives."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from phimm.errors import AudioError, ImageError, PhimmError
from phimm.eval.datasets import (
    ArrowAudioCell,
    DatasetError,
    check_image,
    load_audio,
    read_asr_manifest,
    read_hf_audio_dataset,
    read_librispeech,
    read_vqa_json,
    read_vqa_jsonl,
    read_vqav2,
)


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] * channels, axis=1)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- JSONL manifest -------------------------------------------------------------------------------------------


def test_manifest_reads_any_rate_and_format_relative_to_itself(tmp_path):
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "a.wav", tone(1.0, 16000), 16000)
    sf.write(tmp_path / "clips" / "b.flac", tone(0.5, 8000), 8000)
    sf.write(tmp_path / "clips" / "c.ogg", tone(0.25, 44100, channels=2), 44100)
    manifest = write_jsonl(tmp_path / "test.jsonl", [
        {"audio": "clips/a.wav", "text": "first"},
        "",  # blank lines are skipped but still counted
        {"audio": "clips/b.flac", "text": "second", "duration": 0.5},
        {"audio_filepath": str(tmp_path / "clips" / "c.ogg"), "text": "third"},  # NeMo's key, an absolute path
    ])
    samples = read_asr_manifest(manifest)
    assert [s.id for s in samples] == [1, 3, 4]  # line numbers
    assert [s.text for s in samples] == ["first", "second", "third"]
    assert samples[0].audio == str(tmp_path / "clips" / "a.wav")
    durations = [load_audio(s.audio)[1] for s in samples]
    assert durations == pytest.approx([1.0, 0.5, 0.25], abs=1e-3)
    assert load_audio(samples[1].audio)[0] == samples[1].audio  # a file goes to the pipeline by path


def test_manifest_ids_from_the_lines(tmp_path):
    sf.write(tmp_path / "a.wav", tone(0.1, 16000), 16000)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "utt-a", "audio": "a.wav", "text": "x"},
                                                  {"id": "utt-b", "audio": "a.wav", "text": "y"}])
    assert [s.id for s in read_asr_manifest(manifest)] == ["utt-a", "utt-b"]
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "u", "audio": "a.wav", "text": "x"},
                                               {"id": "u", "audio": "a.wav", "text": "y"}])
    with pytest.raises(DatasetError, match="more than once"):
        read_asr_manifest(dup)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"audio": "a.wav", "text": "unterminated', "line 3: not valid JSON"),
        ('["a.wav", "text"]', "line 3: expected a JSON object"),
        ('{"text": "no audio"}', 'line 3: needs "audio"'),
        ('{"audio": "a.wav"}', 'line 3: needs "text"'),
        ('{"audio": "a.wav", "text": 5}', 'line 3: needs "text"'),
    ],
)
def test_malformed_manifest_line_is_named(tmp_path, bad_line, message):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"audio": "a.wav", "text": "ok"}, {"audio": "a.wav", "text": "ok"},
                                                  bad_line])
    with pytest.raises(DatasetError, match=message) as info:
        read_asr_manifest(manifest)
    assert isinstance(info.value, PhimmError)
    assert str(manifest) in str(info.value)


def test_manifest_missing_or_empty(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_asr_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="no utterances"):
        read_asr_manifest(write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_unreadable_audio_is_an_audio_error_at_load_time(tmp_path):
    (tmp_path / "noise.wav").write_bytes(b"RIFF but not really a wave file")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"audio": "noise.wav", "text": "a"},
                                                  {"audio": "missing.wav", "text": "b"},
                                                  {"audio": "empty.wav", "text": "c"}])
    samples = read_asr_manifest(manifest)  # reading the manifest does not open the audio
    with pytest.raises(AudioError, match="cannot read audio"):
        load_audio(samples[0].audio)
    with pytest.raises(AudioError, match="not found"):
        load_audio(samples[1].audio)
    with pytest.raises(AudioError, match="no samples"):
        load_audio(samples[2].audio)


# ---- LibriSpeech tree -----------------------------------------------------------------------------------------


def make_librispeech(root: Path) -> Path:
    split = root / "LibriSpeech" / "test-clean"
    utterances = {
        ("1089", "134686"): [("0000", "HE HOPED THERE WOULD BE STEW FOR DINNER"), ("0001", "STUFF IT INTO YOU")],
        ("121", "123852"): [("0000", "TWENTY FIVE YEARS")],
    }
    for (speaker, chapter), utts in utterances.items():
        folder = split / speaker / chapter
        folder.mkdir(parents=True)
        lines = []
        for n, (utt, text) in enumerate(utts):
            utt_id = f"{speaker}-{chapter}-{utt}"
            sf.write(folder / f"{utt_id}.flac", tone(0.2 + 0.1 * n, 16000, 300 + 20 * n), 16000)
            lines.append(f"{utt_id} {text}")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return split


def test_librispeech_tree(tmp_path):
    split = make_librispeech(tmp_path)
    for root in (split, tmp_path / "LibriSpeech"):  # the split folder or the folder above it
        samples = read_librispeech(root)
        assert [s.id for s in samples] == ["121-123852-0000", "1089-134686-0000", "1089-134686-0001"]
        assert samples[0].text == "TWENTY FIVE YEARS"
        assert samples[1].audio.endswith("1089/134686/1089-134686-0000.flac")
        assert load_audio(samples[2].audio)[1] == pytest.approx(0.3, abs=1e-3)


def test_librispeech_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        read_librispeech(tmp_path / "nope")
    with pytest.raises(DatasetError, match="trans.txt"):
        read_librispeech(tmp_path)
    folder = tmp_path / "1" / "2"
    folder.mkdir(parents=True)
    (folder / "1-2.trans.txt").write_text("1-2-0000 FINE\n1-2-0001\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"1-2.trans.txt, line 2"):
        read_librispeech(tmp_path)


# ---- Hugging Face datasets folder (save_to_disk) --------------------------------------------------------------


def flac_bytes(seconds: float, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, rate), rate, format="FLAC")
    return buf.getvalue()


def save_to_disk(folder: Path, columns: dict, shards: int = 1) -> Path:
    """What datasets' save_to_disk writes: Arrow stream shards, state.json, dataset_info.json."""
    pa = pytest.importorskip("pyarrow")
    folder.mkdir(parents=True)
    table = pa.table(columns)
    files = []
    rows = table.num_rows
    for i in range(shards):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        part = table.slice(i * rows // shards, (i + 1) * rows // shards - i * rows // shards)
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
        files.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": files, "_split": "test"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"audio": {"_type": "Audio"}}}))
    return folder


def test_hf_dataset_with_encoded_audio(tmp_path):
    folder = save_to_disk(tmp_path / "ds", {
        "id": ["a", "b", "c"],
        "audio": [{"bytes": flac_bytes(0.5, 16000), "path": "a.flac"},
                  {"bytes": flac_bytes(0.25, 8000), "path": "b.flac"},
                  {"bytes": None, "path": "c.wav"}],
        "sentence": ["one", "two", "three"],
    }, shards=2)
    sf.write(folder / "c.wav", tone(0.1, 22050), 22050)  # a cell that only names a file, relative to the folder
    samples = read_hf_audio_dataset(folder)  # "sentence" is found as the text column
    assert [s.id for s in samples] == ["a", "b", "c"]
    assert [s.text for s in samples] == ["one", "two", "three"]
    (array, rate), duration = load_audio(samples[1].audio)
    assert rate == 8000 and array.dtype == np.float32 and duration == pytest.approx(0.25, abs=1e-3)
    path, duration = load_audio(samples[2].audio)
    assert path == str(folder / "c.wav") and duration == pytest.approx(0.1, abs=1e-3)


def test_hf_dataset_with_decoded_arrays_and_chosen_columns(tmp_path):
    folder = save_to_disk(tmp_path / "ds", {
        "clip": [{"array": tone(0.5, 16000).tolist(), "sampling_rate": 16000},
                 {"array": [], "sampling_rate": 16000}],
        "transcript_upper": ["HELLO", "EMPTY"],
    })
    samples = read_hf_audio_dataset(folder, audio_column="clip", text_column="transcript_upper")
    assert [s.id for s in samples] == [0, 1]  # no id column: row numbers
    (array, rate), duration = load_audio(samples[0].audio)
    assert rate == 16000 and duration == pytest.approx(0.5)
    with pytest.raises(AudioError, match="no samples"):
        load_audio(samples[1].audio)


def test_hf_dataset_dict_and_column_errors(tmp_path):
    root = tmp_path / "dd"
    for split in ("test", "validation"):
        save_to_disk(root / split, {"audio": [{"bytes": flac_bytes(0.1, 16000), "path": None}], "text": [split]})
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "validation"]}))
    with pytest.raises(DatasetError, match="--split"):
        read_hf_audio_dataset(root)
    assert read_hf_audio_dataset(root, split="validation")[0].text == "validation"
    with pytest.raises(DatasetError, match="no split 'train'"):
        read_hf_audio_dataset(root, split="train")
    with pytest.raises(DatasetError, match="no audio column 'speech'"):
        read_hf_audio_dataset(root, audio_column="speech", split="test")
    with pytest.raises(DatasetError, match="no text column 'words'"):
        read_hf_audio_dataset(root, text_column="words", split="test")
    with pytest.raises(DatasetError, match="Arrow"):
        read_hf_audio_dataset(tmp_path)


def test_arrow_cell_with_bad_bytes(tmp_path):
    folder = save_to_disk(tmp_path / "ds", {"audio": [{"bytes": b"garbage", "path": None}], "text": ["x"]})
    sample = read_hf_audio_dataset(folder)[0]
    assert isinstance(sample.audio, ArrowAudioCell)
    with pytest.raises(AudioError, match="cannot decode"):
        load_audio(sample.audio)


# ---- VQA: JSONL -----------------------------------------------------------------------------------------------


def make_image(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)).save(path)
    return path


def test_vqa_jsonl(tmp_path):
    make_image(tmp_path / "cat.png")
    sf.write(tmp_path / "q.wav", tone(0.5, 16000), 16000)
    data = write_jsonl(tmp_path / "vqa.jsonl", [
        {"image": "cat.png", "question": "What animal?", "answers": ["cat"] * 10, "question_type": "what"},
        {"image": "cat.png", "audio": "q.wav", "answers": [{"answer": "yes", "answer_id": 1}], "id": "spoken-1"},
        {"image": "cat.png", "question": "Color?", "answer": "gray", "answer_type": "other"},
    ])
    ds = read_vqa_jsonl(data)
    assert ds.metric == "accuracy"
    a, b, c = ds.samples
    assert (a.id, a.image, a.question_type, a.audio) == (1, str(tmp_path / "cat.png"), "what", None)
    assert (b.id, b.audio, b.answers, b.question) == ("spoken-1", str(tmp_path / "q.wav"), ["yes"], "")
    assert (c.answers, c.answer_type) == (["gray"], "other")
    assert check_image(a) == a.image


def test_vqa_jsonl_docvqa_style_is_scored_by_anls(tmp_path):
    data = write_jsonl(tmp_path / "doc.jsonl", [
        {"questionId": 337, "docId": 279, "image": "documents/x.png", "question": "date?",
         "answers": ["1/8/93", "1-8-93"], "question_types": ["handwritten", "form"]},
    ])
    ds = read_vqa_jsonl(data)
    assert ds.metric == "anls"
    assert (ds.samples[0].id, ds.samples[0].question_type) == (337, "handwritten")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"question": "q", "answers": ["a"]}', 'line 2: needs "image"'),
        ('{"image": "x.png", "answers": ["a"]}', 'line 2: needs "question"'),
        ('{"image": "x.png", "question": "q"}', 'line 2: needs "answers"'),
        ('{"image": "x.png", "question": "q", "answers": []}', 'line 2: "answers" must be a non-empty list'),
        ('{"image": "x.png", "question": "q", "answers": [1, 2]}', 'line 2: "answers" must be a non-empty list'),
        ('{"image": "x.png", "question": "q", "answers": ["a"], "audio": 3}', 'line 2: "audio" must be'),
        ("{oops", "line 2: not valid JSON"),
    ],
)
def test_malformed_vqa_line_is_named(tmp_path, bad_line, message):
    data = write_jsonl(tmp_path / "vqa.jsonl", [{"image": "x.png", "question": "q", "answers": ["a"]}, bad_line])
    with pytest.raises(DatasetError, match=message):
        read_vqa_jsonl(data)


def test_missing_image_is_an_image_error_at_run_time(tmp_path):
    ds = read_vqa_jsonl(write_jsonl(tmp_path / "v.jsonl", [{"image": "gone.png", "question": "q", "answers": ["a"]}]))
    with pytest.raises(ImageError, match="not found"):
        check_image(ds.samples[0])


# ---- VQA: the official VQAv2 files ----------------------------------------------------------------------------


def make_vqav2(root: Path, missing_image: bool = True):
    images = root / "val2014"
    images.mkdir(parents=True)
    for image_id in (42, 1337):
        make_image(images / f"COCO_val2014_{image_id:012d}.jpg", seed=image_id)
    (images / "README.txt").write_text("not an image")
    questions = {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
        "questions": [
            {"image_id": 1337, "question": "What color is the bus?", "question_id": 1337000},
            {"image_id": 42, "question": "How many dogs?", "question_id": 42000},
            {"image_id": 42, "question": "Is it sunny?", "question_id": 42001},
        ] + ([{"image_id": 7, "question": "Where?", "question_id": 7000}] if missing_image else []),
    }
    def ann(qid, image_id, answers, qtype, atype):
        return {"question_id": qid, "image_id": image_id, "question_type": qtype, "answer_type": atype,
                "multiple_choice_answer": answers[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(answers)]}
    annotations = {"annotations": [
        ann(42000, 42, ["2"] * 8 + ["3"] * 2, "how many", "number"),
        ann(1337000, 1337, ["red"] * 10, "what color is the", "other"),
        ann(42001, 42, ["yes"] * 9 + ["no"], "is it", "yes/no"),
        ann(7000, 7, ["park"] * 10, "where", "other"),
    ]}
    (root / "questions.json").write_text(json.dumps(questions))
    (root / "annotations.json").write_text(json.dumps(annotations))
    return root / "questions.json", root / "annotations.json", images


def test_vqav2_official_files(tmp_path):
    questions, annotations, images = make_vqav2(tmp_path)
    ds = read_vqav2(questions, annotations, images)
    assert ds.metric == "accuracy"
    assert [s.id for s in ds.samples] == [1337000, 42000, 42001, 7000]  # the questions file's order
    bus, dogs, sunny, where = ds.samples
    assert bus.image == str(images / "COCO_val2014_000000001337.jpg")
    assert dogs.answers == ["2"] * 8 + ["3"] * 2
    assert (dogs.question_type, dogs.answer_type) == ("how many", "number")
    assert where.image is None
    with pytest.raises(ImageError, match="COCO_val2014_000000000007.jpg"):
        check_image(where)
    # the parent folder works too (the images are found in its val2014/)
    assert read_vqav2(questions, annotations, tmp_path).samples[0].image == bus.image


def test_vqav2_coco2017_names(tmp_path):
    questions, annotations, images = make_vqav2(tmp_path, missing_image=False)
    for f in images.glob("COCO_*.jpg"):
        f.rename(f.with_name(f.name.split("_")[-1]))  # 000000000042.jpg
    ds = read_vqav2(questions, annotations, images)
    assert ds.samples[1].image == str(images / "000000000042.jpg")


def test_vqav2_errors(tmp_path):
    questions, annotations, images = make_vqav2(tmp_path)
    data = json.loads(annotations.read_text())
    data["annotations"] = data["annotations"][1:]
    annotations.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="no annotation for question_id 42000"):
        read_vqav2(questions, annotations, images)
    with pytest.raises(DatasetError, match="annotations"):
        read_vqav2(questions, questions, images)
    with pytest.raises(DatasetError, match="no such image folder"):
        read_vqav2(questions, annotations, tmp_path / "nope")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_vqav2(tmp_path / "bad.json", annotations, images)


# ---- VQA: DocVQA / TextVQA JSON -------------------------------------------------------------------------------


def test_docvqa_json(tmp_path):
    (tmp_path / "documents").mkdir()
    make_image(tmp_path / "documents" / "xnbl0037_1.png")
    data = {"dataset_name": "docvqa", "dataset_split": "val", "data": [
        {"questionId": 337, "question": "what is the date mentioned in this letter?", "question_types": ["form"],
         "image": "documents/xnbl0037_1.png", "docId": 279, "answers": ["1/8/93"]},
    ]}
    (tmp_path / "val_v1.0.json").write_text(json.dumps(data))
    ds = read_vqa_json(tmp_path / "val_v1.0.json")
    assert ds.metric == "anls"
    s = ds.samples[0]
    assert (s.id, s.question_type, s.answers) == (337, "form", ["1/8/93"])
    assert check_image(s) == str(tmp_path / "documents" / "xnbl0037_1.png")


def test_textvqa_json(tmp_path):
    images = tmp_path / "train_images"
    images.mkdir()
    make_image(images / "0054c91397f2fe05.jpg")
    data = {"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
        {"question_id": 34602, "question": "what is the brand of this camera?", "image_id": "0054c91397f2fe05",
         "answers": ["nous les gosses", "dakota", "clos culombu", "dakota digital"] + ["dakota"] * 6},
    ]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    ds = read_vqa_json(tmp_path / "TextVQA_0.5.1_val.json", images=images)
    assert ds.metric == "accuracy"
    assert ds.samples[0].id == 34602 and len(ds.samples[0].answers) == 10
    assert check_image(ds.samples[0]) == str(images / "0054c91397f2fe05.jpg")
    with pytest.raises(DatasetError, match="entry 0"):
        (tmp_path / "bad.json").write_text(json.dumps({"data": [{"question": "q", "answers": ["a"]}]}))
        read_vqa_json(tmp_path / "bad.json")
