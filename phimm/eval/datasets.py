"""Readers for the data sets `phimm eval` runs on, as people have them on disk.

Speech (`AsrSample`):

- `read_asr_manifest`: JSON lines `{"audio": path, "text": ...}` (paths relative to the manifest; NeMo's
  `audio_filepath` is read too); the id is the line number, or the line's `"id"`;
- `read_librispeech`: a LibriSpeech tree, `<speaker>/<chapter>/<speaker>-<chapter>.trans.txt` beside the
  `.flac` files, at any depth below the folder given (`LibriSpeech/`, `LibriSpeech/test-clean/`, ...); the id
  is the utterance id;
- `read_hf_audio_dataset`: a Hugging Face `datasets` folder written by `save_to_disk` (Arrow stream files
  `data-*.arrow` with `state.json` and `dataset_info.json`; a `DatasetDict` folder with a split chosen), with an
  audio column (cells `{"bytes", "path"}` or `{"array", "sampling_rate"}`) and a text column; the id is the
  `id` column where there is one, else the row number. Needs `pyarrow`.

Visual questions (`VqaSample`):

- `read_vqa_jsonl`: JSON lines `{"image": path, "question": ..., "answers": [...]}` with optional `"audio"`
  (a spoken question), `"id"`, `"question_type"`, `"answer_type"`;
- `read_vqav2`: the official VQAv2 questions and annotations files and a folder of COCO images, found by image
  id (`COCO_val2014_000000000042.jpg`, or `000000000042.jpg` as in COCO 2017);
- `read_vqa_json`: DocVQA / TextVQA style JSON (`{"data": [{"question", "answers", "image" | "image_id",
  "questionId" | "question_id"}]}`).

A line or an entry that cannot be used raises `DatasetError`, naming the file and the line (or entry). A medium
that cannot be read is not the reader's business: the runner records it as that sample's error and goes on.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phimm.errors import AudioError, ImageError, PhimmError
from phimm.media.audio import decode_audio, mix_down

__all__ = [
    "DatasetError",
    "AsrSample",
    "VqaSample",
    "VqaDataset",
    "read_asr_manifest",
    "read_librispeech",
    "read_hf_audio_dataset",
    "read_vqa_jsonl",
    "read_vqa_json",
    "read_vqav2",
    "load_audio",
]


class DatasetError(PhimmError, ValueError):
    """A data set that cannot be read: a missing file, a malformed line (named by its number), a missing field."""


# --------------------------------------------------------------------------------------------------------------
# samples
# --------------------------------------------------------------------------------------------------------------


class ArrowAudioCell:
    """An audio cell of an Arrow table, decoded only when needed."""

    def __init__(self, column: Any, row: int, root: Path):
        self.column = column
        self.row = row
        self.root = root

    def load(self) -> str | tuple[np.ndarray, int]:
        """The audio as a path (when the cell only names a file) or as `(mono float32 samples, rate)`."""
        value = self.column[self.row].as_py()
        if isinstance(value, str):
            return self._path(value)
        if not isinstance(value, dict):
            raise AudioError(f"row {self.row}: an audio cell must be a dict or a path, not {type(value).__name__}")
        if value.get("bytes") is not None:
            try:
                return decode_audio(value["bytes"])
            except Exception as e:
                raise AudioError(f"row {self.row}: cannot decode the audio bytes: {e}") from e
        if value.get("array") is not None:
            if value.get("sampling_rate") is None:
                raise AudioError(f"row {self.row}: an audio 'array' needs its 'sampling_rate'")
            array = np.asarray(value["array"], dtype=np.float32)
            if array.ndim == 2:  # [channels, samples] as datasets keeps multichannel audio
                array = mix_down(array.T)
            return array, int(value["sampling_rate"])
        if value.get("path"):
            return self._path(value["path"])
        raise AudioError(f"row {self.row}: the audio cell has no 'bytes', 'array' or 'path'")

    def _path(self, path: str) -> str:
        p = Path(path)
        if not p.is_absolute() and not p.exists():
            p = self.root / p
        return str(p)

    def __repr__(self) -> str:
        return f"ArrowAudioCell(row={self.row})"


@dataclass
class AsrSample:
    """One utterance: an id, its audio (a path, or an Arrow cell decoded on demand) and the reference text."""

    id: int | str
    audio: str | ArrowAudioCell
    text: str


@dataclass
class VqaSample:
    """One visual question. `image` is None when the reader could not find it (`image_error` says why); `audio`
    is set for a spoken question."""

    id: int | str
    image: str | None
    question: str
    answers: list[str]
    audio: str | None = None
    question_type: str | None = None
    answer_type: str | None = None
    image_error: str | None = None


@dataclass
class VqaDataset:
    """Visual questions and the metric their data set is scored by (`"accuracy"` or `"anls"`)."""

    samples: list[VqaSample]
    metric: str = "accuracy"
    source: str = ""
    extra: dict = field(default_factory=dict)


def _sf():
    import soundfile

    return soundfile


def load_audio(audio: str | ArrowAudioCell) -> tuple[str | tuple[np.ndarray, int], float]:
    """What to hand the pipeline for a sample's audio (a path, or `(samples, rate)`) and its duration in seconds.

    Raises `AudioError` for a file that is missing, that soundfile cannot read, or that holds no samples.
    """
    value = audio.load() if isinstance(audio, ArrowAudioCell) else audio
    if isinstance(value, tuple):
        array, rate = value
        if array.size == 0:
            raise AudioError("the audio holds no samples")
        if rate <= 0:
            raise AudioError(f"invalid sampling rate {rate}")
        return (array, rate), array.shape[-1] / rate
    if not os.path.isfile(value):
        raise AudioError(f"audio file not found: {value}")
    try:
        info = _sf().info(value)
    except Exception as e:
        raise AudioError(f"cannot read audio {value}: {e}") from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"the audio file holds no samples: {value}")
    return value, info.frames / info.samplerate


def _check_unique(ids: list, source: str) -> None:
    seen = set()
    for sample_id in ids:
        key = str(sample_id)
        if key in seen:
            raise DatasetError(f"{source}: the id {sample_id!r} appears more than once; ids must be unique")
        seen.add(key)


def _json_lines(path: str | os.PathLike):
    """(line number, object) for each non-blank line of a JSON lines file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no such file: {path}")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}, line {number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def _resolve(path_value: str, base: Path) -> str:
    p = Path(os.path.expanduser(path_value))
    return str(p if p.is_absolute() else base / p)


def _sample_id(obj: dict, number: int, where: str) -> int | str:
    sample_id = obj.get("id", number)
    if not isinstance(sample_id, (int, str)) or isinstance(sample_id, bool):
        raise DatasetError(f"{where}: 'id' must be a string or an integer")
    return sample_id


# --------------------------------------------------------------------------------------------------------------
# speech
# --------------------------------------------------------------------------------------------------------------


def read_asr_manifest(path: str | os.PathLike) -> list[AsrSample]:
    """Utterances of a JSON lines manifest, in file order; audio paths are relative to the manifest's folder."""
    path = Path(path)
    base = path.parent
    samples = []
    for number, obj in _json_lines(path):
        where = f"{path}, line {number}"
        audio = obj.get("audio", obj.get("audio_filepath"))
        if not isinstance(audio, str) or not audio:
            raise DatasetError(f"{where}: needs \"audio\", the path of an audio file")
        text = obj.get("text")
        if not isinstance(text, str):
            raise DatasetError(f"{where}: needs \"text\", the reference transcript (a string)")
        samples.append(AsrSample(_sample_id(obj, number, where), _resolve(audio, base), text))
    if not samples:
        raise DatasetError(f"{path}: the manifest holds no utterances")
    _check_unique([s.id for s in samples], str(path))
    return samples


_AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".opus", ".mp3", ".aiff", ".aif")


def read_librispeech(root: str | os.PathLike) -> list[AsrSample]:
    """Utterances of a LibriSpeech-style tree: each `*.trans.txt` line is `<utterance id> <TRANSCRIPT>`, with the
    audio `<utterance id>.flac` beside it. Sorted by utterance id."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"no such folder: {root}")
    transcripts = sorted(root.rglob("*.trans.txt"))
    if not transcripts:
        raise DatasetError(f"{root}: no *.trans.txt files below it (expected <speaker>/<chapter>/*.trans.txt)")
    samples = []
    for trans in transcripts:
        with open(trans, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                parts = line.strip().split(maxsplit=1)
                if len(parts) != 2:
                    raise DatasetError(f"{trans}, line {number}: expected '<utterance id> <transcript>'")
                utt_id, text = parts
                audio = trans.parent / f"{utt_id}.flac"
                if not audio.exists():
                    for ext in _AUDIO_EXTENSIONS:
                        if (trans.parent / f"{utt_id}{ext}").exists():
                            audio = trans.parent / f"{utt_id}{ext}"
                            break
                samples.append(AsrSample(utt_id, str(audio), text))
    samples.sort(key=lambda s: _natural_key(str(s.id)))
    _check_unique([s.id for s in samples], str(root))
    return samples


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


_TEXT_COLUMNS = ("text", "sentence", "transcription", "transcript", "normalized_text", "raw_text")


def _open_arrow_folder(root: Path, split: str | None):
    """The pyarrow Table of a `save_to_disk` folder (a Dataset, or one split of a DatasetDict)."""
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc
    except ImportError:
        raise DatasetError("reading a Hugging Face datasets folder needs pyarrow: pip install pyarrow") from None
    if not root.is_dir():
        raise DatasetError(f"no such folder: {root}")
    dict_file = root / "dataset_dict.json"
    if dict_file.is_file():
        splits = json.loads(dict_file.read_text(encoding="utf-8")).get("splits", [])
        if split is None:
            if len(splits) != 1:
                raise DatasetError(f"{root} holds the splits {splits}: choose one with --split")
            split = splits[0]
        if split not in splits:
            raise DatasetError(f"{root} has no split {split!r}; it has {splits}")
        root = root / split
    elif split is not None and (root / split).is_dir():
        root = root / split
    state_file = root / "state.json"
    files: list[Path] = []
    if state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        files = [root / entry["filename"] for entry in state.get("_data_files", [])]
    if not files:
        files = sorted(root.glob("data-*.arrow")) or sorted(root.glob("*.arrow"))
    if not files:
        raise DatasetError(f"{root}: no Arrow files (expected data-*.arrow from datasets' save_to_disk)")
    tables = []
    for file in files:
        if not file.is_file():
            raise DatasetError(f"{root}: state.json names {file.name}, which is missing")
        try:
            source = pa.memory_map(str(file))
            try:
                tables.append(ipc.open_stream(source).read_all())
            except pa.ArrowInvalid:
                tables.append(ipc.open_file(pa.memory_map(str(file))).read_all())
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{file}: not an Arrow file ({e})") from None
    return (pa.concat_tables(tables) if len(tables) > 1 else tables[0]), root


def read_hf_audio_dataset(
    root: str | os.PathLike,
    audio_column: str = "audio",
    text_column: str | None = None,
    split: str | None = None,
    id_column: str | None = "id",
) -> list[AsrSample]:
    """Utterances of a Hugging Face `datasets` folder written by `save_to_disk`, in row order.

    `text_column=None` takes the first of "text", "sentence", "transcription", "transcript", "normalized_text"
    that the data set has. The id is `id_column` where the data set has it, else the row number.
    """
    table, folder = _open_arrow_folder(Path(root), split)
    columns = table.column_names
    if audio_column not in columns:
        raise DatasetError(f"{folder}: no audio column {audio_column!r} (columns: {columns}); use --audio-column")
    if text_column is None:
        text_column = next((c for c in _TEXT_COLUMNS if c in columns), None)
        if text_column is None:
            raise DatasetError(f"{folder}: no text column among {list(_TEXT_COLUMNS)} (columns: {columns}); "
                               "use --text-column")
    elif text_column not in columns:
        raise DatasetError(f"{folder}: no text column {text_column!r} (columns: {columns}); use --text-column")
    texts = table.column(text_column).to_pylist()
    ids = table.column(id_column).to_pylist() if id_column and id_column in columns else list(range(table.num_rows))
    audio = table.column(audio_column)
    samples = []
    for row, (sample_id, text) in enumerate(zip(ids, texts)):
        if not isinstance(text, str):
            raise DatasetError(f"{folder}, row {row}: the text column {text_column!r} holds {text!r}, not a string")
        samples.append(AsrSample(sample_id if isinstance(sample_id, (int, str)) else str(sample_id),
                                 ArrowAudioCell(audio, row, folder), text))
    if not samples:
        raise DatasetError(f"{folder}: the data set has no rows")
    _check_unique([s.id for s in samples], str(folder))
    return samples


# --------------------------------------------------------------------------------------------------------------
# visual questions
# --------------------------------------------------------------------------------------------------------------


def _answers(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        out = []
        for item in value:
            if isinstance(item, dict):  # VQAv2 style {"answer": ..., "answer_id": ...}
                item = item.get("answer")
            if not isinstance(item, str):
                break
            out.append(item)
        else:
            return out
    raise DatasetError(f"{where}: \"answers\" must be a non-empty list of strings")


def read_vqa_jsonl(path: str | os.PathLike) -> VqaDataset:
    """Visual questions of a JSON lines file, in file order; media paths are relative to the file's folder.

    The metric is ANLS when the lines look like DocVQA (a `docId` or `questionId` field), else VQA accuracy.
    """
    path = Path(path)
    base = path.parent
    samples = []
    docvqa = False
    for number, obj in _json_lines(path):
        where = f"{path}, line {number}"
        image = obj.get("image")
        if not isinstance(image, str) or not image:
            raise DatasetError(f"{where}: needs \"image\", the path of an image file")
        audio = obj.get("audio")
        if audio is not None and (not isinstance(audio, str) or not audio):
            raise DatasetError(f"{where}: \"audio\" must be the path of an audio file")
        question = obj.get("question", "")
        if not isinstance(question, str) or (not question.strip() and audio is None):
            raise DatasetError(f"{where}: needs \"question\", a string (or \"audio\", a spoken question)")
        if "answers" not in obj and "answer" not in obj:
            raise DatasetError(f"{where}: needs \"answers\", the list of reference answers")
        answers = _answers(obj["answers"] if "answers" in obj else obj["answer"], where)
        sample_id = obj.get("id", obj.get("question_id", obj.get("questionId", number)))
        docvqa = docvqa or "docId" in obj or "questionId" in obj
        question_type = obj.get("question_type")
        if question_type is None and isinstance(obj.get("question_types"), list) and obj["question_types"]:
            question_type = obj["question_types"][0]
        samples.append(VqaSample(
            id=_sample_id({"id": sample_id}, number, where),
            image=_resolve(image, base),
            question=question,
            answers=answers,
            audio=_resolve(audio, base) if audio else None,
            question_type=str(question_type) if question_type is not None else None,
            answer_type=str(obj["answer_type"]) if obj.get("answer_type") is not None else None,
        ))
    if not samples:
        raise DatasetError(f"{path}: the file holds no questions")
    _check_unique([s.id for s in samples], str(path))
    return VqaDataset(samples, metric="anls" if docvqa else "accuracy", source=str(path))


def _load_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no such {what} file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_vqa_json(path: str | os.PathLike, images: str | os.PathLike | None = None) -> VqaDataset:
    """Visual questions of a DocVQA / TextVQA style JSON file: `{"dataset_name": ..., "data": [...]}`.

    Each entry has "question", "answers" and either "image" (a path relative to `images`, or to the file's
    folder) or "image_id" (`<images>/<image_id>.jpg`, as TextVQA). The id is "questionId" (DocVQA),
    "question_id" (TextVQA) or the entry's position. DocVQA (and InfographicVQA) are scored by ANLS, others by
    VQA accuracy.
    """
    path = Path(path)
    data = _load_json(path, "questions")
    entries = data.get("data") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected {{\"data\": [...]}}, a list of questions")
    name = str(data.get("dataset_name", "")).lower() if isinstance(data, dict) else ""
    base = Path(images) if images is not None else path.parent
    samples = []
    docvqa = "docvqa" in name or "infographic" in name
    for index, entry in enumerate(entries):
        where = f"{path}, entry {index}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected an object")
        question = entry.get("question")
        if not isinstance(question, str):
            raise DatasetError(f"{where}: needs \"question\", a string")
        answers = _answers(entry.get("answers"), where)
        docvqa = docvqa or "docId" in entry
        if isinstance(entry.get("image"), str):
            image = _resolve(entry["image"], base)
        elif entry.get("image_id") is not None:
            image = _find_image_by_name(base, str(entry["image_id"]))
        else:
            raise DatasetError(f"{where}: needs \"image\" (a path) or \"image_id\"")
        sample_id = entry.get("questionId", entry.get("question_id", index))
        types = entry.get("question_types")
        question_type = types[0] if isinstance(types, list) and types else entry.get("question_type")
        samples.append(VqaSample(
            id=sample_id if isinstance(sample_id, (int, str)) else str(sample_id),
            image=image,
            question=question,
            answers=answers,
            question_type=str(question_type) if question_type is not None else None,
            answer_type=str(entry["answer_type"]) if entry.get("answer_type") is not None else None,
        ))
    if not samples:
        raise DatasetError(f"{path}: the file holds no questions")
    _check_unique([s.id for s in samples], str(path))
    return VqaDataset(samples, metric="anls" if docvqa else "accuracy", source=str(path))


def _find_image_by_name(folder: Path, stem: str) -> str:
    for ext in (".jpg", ".jpeg", ".png", ".JPG", ".PNG"):
        if (folder / f"{stem}{ext}").exists():
            return str(folder / f"{stem}{ext}")
    return str(folder / f"{stem}.jpg")


_IMAGE_ID_RE = re.compile(r"(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def _index_images(folder: Path, subtype: str | None) -> dict[int, Path]:
    """image id -> file, from the trailing digits of each image name; a name with the split's subtype
    ("val2014") wins over others with the same id."""
    index: dict[int, Path] = {}
    for candidate in (folder, folder / subtype) if subtype else (folder,):
        if not candidate.is_dir():
            continue
        with os.scandir(candidate) as it:
            for entry in it:
                m = _IMAGE_ID_RE.search(entry.name)
                if not m or not entry.is_file():
                    continue
                image_id = int(m.group(1))
                if image_id not in index or (subtype and subtype in entry.name and subtype not in index[image_id].name):
                    index[image_id] = Path(entry.path)
        if index:
            break
    return index


def read_vqav2(
    questions: str | os.PathLike,
    annotations: str | os.PathLike,
    images: str | os.PathLike,
) -> VqaDataset:
    """Visual questions of the official VQAv2 files, in the order of the questions file.

    Each question's ten human answers, question type and answer type come from the annotations file; its image
    is found in `images` by image id (`COCO_<subtype>_<image_id:012d>.jpg`, or any name ending in the id).
    """
    q_data = _load_json(questions, "questions")
    a_data = _load_json(annotations, "annotations")
    if not isinstance(q_data, dict) or not isinstance(q_data.get("questions"), list):
        raise DatasetError(f"{questions}: expected {{\"questions\": [...]}} (a VQAv2 questions file)")
    if not isinstance(a_data, dict) or not isinstance(a_data.get("annotations"), list):
        raise DatasetError(f"{annotations}: expected {{\"annotations\": [...]}} (a VQAv2 annotations file)")
    images = Path(images)
    if not images.is_dir():
        raise DatasetError(f"no such image folder: {images}")
    subtype = q_data.get("data_subtype")
    by_question = {}
    for index, ann in enumerate(a_data["annotations"]):
        if not isinstance(ann, dict) or "question_id" not in ann:
            raise DatasetError(f"{annotations}, annotation {index}: needs \"question_id\"")
        by_question[ann["question_id"]] = ann
    image_index = _index_images(images, subtype)
    samples = []
    for index, q in enumerate(q_data["questions"]):
        where = f"{questions}, question {index}"
        if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= q.keys():
            raise DatasetError(f"{where}: needs \"question_id\", \"image_id\" and \"question\"")
        ann = by_question.get(q["question_id"])
        if ann is None:
            raise DatasetError(f"{annotations}: no annotation for question_id {q['question_id']} "
                               f"(are these the annotations of {subtype or 'the same split'}?)")
        answers = _answers(ann.get("answers"), f"{annotations}, question_id {q['question_id']}")
        image = image_index.get(int(q["image_id"]))
        samples.append(VqaSample(
            id=q["question_id"],
            image=str(image) if image is not None else None,
            question=q["question"],
            answers=answers,
            question_type=ann.get("question_type"),
            answer_type=ann.get("answer_type"),
            image_error=None if image is not None else
            f"no image for image_id {q['image_id']} in {images} "
            f"(expected COCO_{subtype or '<subtype>'}_{int(q['image_id']):012d}.jpg)",
        ))
    if not samples:
        raise DatasetError(f"{questions}: the file holds no questions")
    _check_unique([s.id for s in samples], str(questions))
    return VqaDataset(samples, metric="accuracy", source=f"{questions} + {annotations}")


def check_image(sample: VqaSample) -> str:
    """The sample's image path; raises `ImageError` when the reader found none or the file is missing."""
    if sample.image is None:
        raise ImageError(sample.image_error or "no image")
    if not os.path.isfile(sample.image):
        raise ImageError(f"image file not found: {sample.image}")
    return sample.image
