"""phimm.toy: the toy domain's scenes, questions, speech and splits honour the spec and are deterministic."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from phimm.toy import domain
from phimm.toy.domain import COLORS, QUESTION_TYPES, VOCAB, WHITE, Scene, Shape
from phimm.toy.images import random_scene, render_scene, scene_problems, shape_bbox

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


def _scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(n)]


# ---------------------------------------------------------------- domain


def test_vocabulary_matches_spec():
    assert COLORS["red"] == (220, 30, 30) and COLORS["white"] == (250, 250, 250)
    assert len(COLORS) == 8 and len(domain.NUMBERS) == 10 and domain.SHAPES == ("circle", "square", "triangle",
                                                                                 "star")
    assert set(QUESTION_TYPES) == {"what_color", "what_shape", "how_many", "is_there"}


def test_utterances_are_domain_words():
    rng = random.Random(0)
    for _ in range(300):
        text, kind = domain.utterance(rng)
        words = text.split()
        assert 1 <= len(words) <= domain.MAX_UTTERANCE_WORDS, text
        assert set(words) <= set(VOCAB) and text == " ".join(words) and text == text.lower()
    assert domain.shape_phrase_of([Shape("circle", "red", (0, 0), 1), Shape("star", "blue", (0, 0), 1)]) == \
        "a red circle and a blue star"


@pytest.mark.parametrize("question, answer", [
    ("what color is the circle", "red"),
    ("what shape is the blue one", "star"),
    ("what shape is the white one", "square"),
    ("how many shapes are there", "three"),
    ("is there a red circle", "yes"),
    ("is there a red star", "no"),
    ("is there a green circle", "no"),
])
def test_answer_question_table(question, answer):
    scene = Scene(128, 128, (200, 220, 240), (Shape("circle", "red", (30, 30), 30), Shape("star", "blue", (90, 90), 30),
                                             Shape("square", "white", (30, 90), 30)))
    assert domain.answer_question(scene, question) == answer


def test_questions_are_correct_and_balanced():
    rng = random.Random(1)
    qtypes, yes_no = Counter(), Counter()
    for scene in _scenes(300, seed=1):
        for qtype in domain.available_question_types(scene):
            q = domain.question_for_scene(rng, scene, qtype)
            assert q.qtype == qtype and q.text.split()[0] in ("what", "how", "is")
            assert domain.answer_question(scene, q.text) == q.answer
            assert q.answer in VOCAB and " " not in q.answer
            qtypes[qtype] += 1
            if qtype == "is_there":
                yes_no[q.answer] += 1
    assert all(qtypes[t] > 100 for t in QUESTION_TYPES)
    assert abs(yes_no["yes"] - yes_no["no"]) < 0.15 * sum(yes_no.values())
    # "what color is the {shape}" needs that shape to occur once
    twins = Scene(128, 128, WHITE, (Shape("circle", "red", (30, 30), 30), Shape("circle", "blue", (90, 90), 30)))
    assert "what_color" not in domain.available_question_types(twins)


def test_text_tasks():
    rng = random.Random(2)
    for _ in range(200):
        prompt, answer, task = domain.text_example(rng)
        assert set(answer.split()) <= set(VOCAB), answer
        if task == "copy":
            assert prompt == f"repeat: {answer} ="
    prompt, answer, _ = domain.text_example(random.Random(3), "lookup")
    assert prompt.endswith("?") and answer in VOCAB
    lines = domain.corpus(random.Random(4), 50)
    assert len(lines) == 50 and domain.ASR_INSTRUCTION in lines


# ---------------------------------------------------------------- images


def test_scene_constraints():
    sides = []
    for scene in _scenes(400, seed=5):
        assert scene_problems(scene) == [], scene
        sides.append(scene.width)
        assert scene.width == scene.height
        bg = tuple(scene.background)
        assert bg == WHITE or max(abs(c - 250) for c in bg) >= 20, bg  # white shapes show
        assert min(bg) >= 150  # a light background
    assert min(sides) < 110 and max(sides) > 240
    counts = Counter(len(s.shapes) for s in _scenes(300, seed=6))
    assert set(counts) == {1, 2, 3}


def test_random_scene_arguments():
    rng = random.Random(7)
    s = random_scene(rng, size=96, n_shapes=3, white_background=True, rotate=False)
    assert s.width == 96 and len(s.shapes) == 3 and s.background == WHITE and "white" not in s.colors
    assert all(sh.rotation == 0 for sh in s.shapes)
    with pytest.raises(ValueError):
        random_scene(rng, n_shapes=4)


def test_rendered_colours_and_boxes():
    for scene in _scenes(120, seed=8):
        img = np.asarray(render_scene(scene))
        assert img.shape == (scene.height, scene.width, 3) and img.dtype == np.uint8
        assert tuple(img[0, 0]) == tuple(scene.background)
        for s in scene.shapes:
            cx, cy = s.center
            assert tuple(img[int(cy), int(cx)]) == COLORS[s.color], (scene, s)
            # pixels of this colour (anti-aliased edges excluded) sit inside the shape's box, 15%..45% of the side
            ys, xs = np.nonzero(np.all(img == COLORS[s.color], axis=-1))
            x0, y0, x1, y1 = shape_bbox(s)
            assert xs.min() >= int(x0) - 1 and xs.max() <= x1 + 1 and ys.min() >= int(y0) - 1 and ys.max() <= y1 + 1
            side = scene.width
            for extent in (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1):
                assert 0.15 * side - 2 <= extent <= 0.45 * side + 1, (extent, side, s)


def test_render_is_deterministic():
    a = [render_scene(s).tobytes() for s in _scenes(20, seed=9)]
    b = [render_scene(s).tobytes() for s in _scenes(20, seed=9)]
    assert a == b
    assert a != [render_scene(s).tobytes() for s in _scenes(20, seed=10)]


# ---------------------------------------------------------------- speech


@pytest.fixture(scope="module")
def speaker():
    pytest.importorskip("espeakng_loader")
    from phimm.toy.speech import Speaker

    return Speaker()


def _duration(speaker, text, **kw) -> float:
    x, sr = speaker.say(text, **kw)
    assert x.dtype == np.float32 and x.ndim == 1 and x.size > 0 and np.isfinite(x).all()
    assert np.abs(x).max() <= 1.0 and np.abs(x).max() > 0.05
    return x.size / sr


def test_speech_basics(speaker):
    from phimm.toy.speech import variant_names

    x, sr = speaker.say("four seven one nine")
    assert sr == 22050 and 0.5 < x.size / sr < 3.0
    names = variant_names()
    assert "" in names and "m3" in names and "f2" in names and len(names) > 20
    with pytest.raises(ValueError):
        speaker.say("one", variant="no-such-variant")


@pytest.mark.parametrize("variant", ["f2", "caleb", "m3"])  # breathy, speechPlayer, plain
def test_speech_depends_only_on_arguments(speaker, variant):
    a, _ = speaker.say("what color is the circle", variant=variant, rate=150, pitch=40, seed=1)
    speaker.say("one two three", variant="whisper", seed=2)
    speaker.say("a red star", variant="Reed", rate=200)
    b, _ = speaker.say("what color is the circle", variant=variant, rate=150, pitch=40, seed=1)
    assert np.array_equal(a, b)


def _say_in_child(queue):
    from phimm.toy.speech import Speaker

    queue.put(Speaker().say("four seven one nine", variant="m3")[0])


def test_speech_in_forked_child(speaker):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_say_in_child, args=(queue,))
    proc.start()
    child = queue.get(timeout=30)
    proc.join(timeout=30)
    assert proc.exitcode == 0
    assert np.array_equal(child, speaker.say("four seven one nine", variant="m3")[0])


def test_speech_duration_tracks_words_and_rate(speaker):
    one = _duration(speaker, "four")
    four = _duration(speaker, "four seven one nine")
    eight = _duration(speaker, "four seven one nine two two eight six")
    assert one < four < eight
    slow = _duration(speaker, "four seven one nine two", rate=130)
    fast = _duration(speaker, "four seven one nine two", rate=210)
    assert fast < 0.85 * slow


def test_add_noise_snr():
    from phimm.toy.speech import add_noise

    x = np.sin(np.linspace(0, 400, 20000)).astype(np.float32) * 0.5
    y = add_noise(x, 20.0, random.Random(0))
    snr = 10 * np.log10(np.mean(x ** 2) / np.mean((y - x) ** 2))
    assert abs(snr - 20.0) < 0.5
    assert np.array_equal(y, add_noise(x, 20.0, random.Random(0)))


# ---------------------------------------------------------------- splits


def _digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        for key in sorted(s):
            v = s[key]
            if isinstance(v, np.ndarray):
                h.update(v.tobytes())
            elif hasattr(v, "tobytes"):
                h.update(v.tobytes())
            else:
                h.update(repr(v).encode())
    return h.hexdigest()


@pytest.mark.parametrize("kind", ["asr", "vqa", "spoken_vqa", "text"])
def test_split_determinism(kind):
    from phimm.toy.data import make_split

    a = make_split(kind, 6, seed=3)
    assert _digest(a) == _digest(make_split(kind, 6, seed=3))
    assert _digest(a) != _digest(make_split(kind, 6, seed=4))
    assert _digest(a) != _digest(make_split(kind, 6, seed=3, heldout=True))


def test_heldout_voices_are_disjoint():
    from phimm.toy.data import make_split, voice_variants

    train, held = set(voice_variants(False)), set(voice_variants(True))
    assert train and held and not train & held and "" in train
    for s in make_split("asr", 12, seed=1, heldout=True):
        assert s["speech"]["variant"] in held and 130 <= s["speech"]["rate"] <= 210
        assert 30 <= s["speech"]["pitch"] <= 70


def test_vqa_split_balance_and_answers():
    from phimm.toy.data import make_split

    samples = make_split("vqa", 48, seed=5)
    assert Counter(s["question_type"] for s in samples) == {t: 12 for t in QUESTION_TYPES}
    assert Counter(s["answer"] for s in samples if s["question_type"] == "is_there") == {"yes": 6, "no": 6}
    for s in samples:
        assert domain.answer_question(s["scene"], s["question"]) == s["answer"]
        assert s["image"].size == (s["scene"].width, s["scene"].height)


def test_written_manifests(tmp_path: Path):
    import soundfile as sf
    from PIL import Image

    from phimm.toy.data import FILE_SAMPLE_RATES, main, make_split, read_manifest

    for kind in ("asr", "vqa", "spoken_vqa", "text"):
        out = tmp_path / kind
        samples = make_split(kind, 8, seed=2, out_dir=out)
        records = read_manifest(out / f"{kind}.jsonl")
        assert len(records) == 8 and [r["id"] for r in records] == [s["id"] for s in samples]
        for r, s in zip(records, samples):
            if kind in ("asr", "spoken_vqa"):
                x, sr = sf.read(str(out / r["audio"]), dtype="float32")
                assert sr in {f or 22050 for f in FILE_SAMPLE_RATES} and sr == s["sample_rate"]
                assert x.ndim == 1 and np.allclose(x, s["audio"], atol=1 / 16000)
            if kind == "asr":
                assert r["text"] == s["text"]
            if kind in ("vqa", "spoken_vqa"):
                img = Image.open(out / r["image"])
                assert img.mode == "RGB" and np.array_equal(np.asarray(img), np.asarray(s["image"]))
                assert r["answers"] == [s["answer"]] * 10 and r["question_type"] in QUESTION_TYPES
                assert r["question"] == s["question"]
            if kind == "text":
                assert set(r) >= {"prompt", "answer"}
    # the same split written twice is byte-identical
    make_split("spoken_vqa", 8, seed=2, out_dir=tmp_path / "again")
    for f in sorted((tmp_path / "spoken_vqa").rglob("*.*")):
        assert f.read_bytes() == (tmp_path / "again" / f.relative_to(tmp_path / "spoken_vqa")).read_bytes(), f
    # CLI, with one sample rate for all audio
    assert main(["--kind", "asr", "--n", "3", "--seed", "1", "--out", str(tmp_path / "cli"),
                 "--sample-rate", "16000"]) == 0
    for r in read_manifest(tmp_path / "cli" / "asr.jsonl"):
        assert sf.info(str(tmp_path / "cli" / r["audio"])).samplerate == 16000


def test_demo_examples(tmp_path: Path):
    from phimm.toy.examples import EXAMPLES, SCENES, SPEECH, make_examples

    paths = make_examples(tmp_path)
    assert all(p.stat().st_size < 60_000 for p in paths)
    listed = json.loads((tmp_path / "examples.json").read_text())
    assert listed == EXAMPLES
    for ex in listed:
        assert set(ex) == {"text", "image", "audio", "expected"}
        for key in ("image", "audio"):
            assert ex[key] is None or (tmp_path / ex[key]).exists()
        if ex["image"] and ex["audio"] is None:
            assert domain.answer_question(SCENES[ex["image"]], ex["text"]) == ex["expected"]
        if ex["image"] and ex["audio"]:
            assert domain.answer_question(SCENES[ex["image"]], SPEECH[ex["audio"]]) == ex["expected"]
        if ex["image"] is None and ex["audio"]:
            assert SPEECH[ex["audio"]] == ex["expected"]
    assert all(scene_problems(s) == [] for s in SCENES.values())


def test_shipped_demo_examples_are_the_scripts_output(tmp_path: Path):
    import soundfile as sf
    from PIL import Image

    from phimm.toy.examples import DEFAULT_OUT, make_examples

    if not (DEFAULT_OUT / "examples.json").exists():
        pytest.skip("demo/examples not in this checkout")
    make_examples(tmp_path)
    assert json.loads((DEFAULT_OUT / "examples.json").read_text()) == json.loads(
        (tmp_path / "examples.json").read_text())
    for f in sorted(tmp_path.iterdir()):
        if f.suffix == ".png":
            assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(DEFAULT_OUT / f.name))), f.name
        elif f.suffix == ".wav":
            assert np.array_equal(sf.read(str(f))[0], sf.read(str(DEFAULT_OUT / f.name))[0]), f.name
