"""The embedded default model: `phimm.load()` loads it and answers toy-domain requests on every route, and the
text route is bit-identical with and without its adapters."""

from __future__ import annotations

import pytest
import torch

import phimm
from phimm.pipeline import EMBEDDED_DIR
from phimm.toy.domain import ASR_INSTRUCTION, SPOKEN_VQA_INSTRUCTION, WHITE, Scene, Shape
from phimm.toy.images import render_scene

pytestmark = pytest.mark.skipif(not (EMBEDDED_DIR / "config.json").is_file(), reason="no embedded model shipped")


@pytest.fixture(scope="module")
def pipe():
    return phimm.load()


def _scene():
    shapes = (Shape("circle", "red", (50.0, 60.0), 50.0), Shape("square", "blue", (140.0, 130.0), 60.0))
    return render_scene(Scene(192, 192, WHITE, shapes))


def _speech(text: str, rate: int = 170):
    from phimm.toy.speech import Speaker

    return Speaker().say(text, "en", "m3", rate=rate, pitch=50)


def _user(*parts):
    return phimm.Request(messages=[{"role": "user", "content": list(parts)}])


def test_is_the_default_model(pipe):
    assert pipe.name == "embedded"
    assert sorted(pipe.adapters) == ["speech", "vision"]


def test_vqa(pipe):
    # easy cases (large, well separated shapes) the shipped model gets right; its held-out accuracy is in
    # phimm/embedded/README.md
    img = _scene()
    qs = {"what color is the circle": "red", "how many shapes are there": "two", "is there a red circle": "yes"}
    reqs = [_user({"type": "image", "image": img}, {"type": "text", "text": q}) for q in qs]
    one = render_scene(Scene(160, 160, WHITE, (Shape("circle", "red", (80.0, 80.0), 60.0),)))
    reqs.append(_user({"type": "image", "image": one}, {"type": "text", "text": "how many shapes are there"}))
    outs = pipe(reqs)
    assert all(o.route.adapter == "vision" for o in outs)
    assert [o.text.strip() for o in outs] == list(qs.values()) + ["one"]


def test_asr(pipe):
    texts = ["a red circle", "five five eight", "how many shapes are there"]
    reqs = []
    for t in texts:
        wave, sr = _speech(t)
        reqs.append(_user({"type": "audio", "audio": (wave, sr)}, {"type": "text", "text": ASR_INSTRUCTION}))
    outs = pipe(reqs)
    assert all(o.route.adapter == "speech" for o in outs)
    assert [o.text.strip() for o in outs] == texts


def test_spoken_question_about_an_image(pipe):
    wave, sr = _speech("what color is the circle")
    one = render_scene(Scene(160, 160, WHITE, (Shape("circle", "red", (80.0, 80.0), 60.0),)))
    out = pipe(_user({"type": "image", "image": one}, {"type": "audio", "audio": (wave, sr)},
                     {"type": "text", "text": SPOKEN_VQA_INSTRUCTION}))
    assert out.route.adapter == "vision"
    assert out.route.audio_projector == phimm.AudioProjector.VISION_SPEECH
    assert out.text.strip() == "red"


def test_text_route_and_bit_identical_without_adapters(pipe):
    base = phimm.load(adapters=[])
    reqs = [_user({"type": "text", "text": "the circle is blue . the square is green . say all shapes :"}),
            _user({"type": "text", "text": "repeat: four seven one ="})]
    with_a = pipe(reqs, output_logits=True, max_new_tokens=8)
    without = base(reqs, output_logits=True, max_new_tokens=8)
    assert with_a[0].route.adapter is None
    assert with_a[0].text.strip() == "a blue circle and a green square"
    for a, b in zip(with_a, without):
        assert a.token_ids == b.token_ids
        assert torch.equal(a.logits, b.logits)
