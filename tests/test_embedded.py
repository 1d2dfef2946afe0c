"""The embedded default model: `phimm.load()` loads it and answers toy-domain requests on every route, and the
text route is bit-identical with and without its adapters.

The quality checks run small held-out sets (`phimm.toy.data`, heldout=True: voices, rates and seeds training never
used) through the public pipeline and hold each route to a floor well above chance and well below the model's
measured scores (phimm/embedded/README.md): a broken resampler, feature extractor, router, LoRA or projector
drops a route to chance, which these floors catch; the exact scores are the eval stage's job."""

from __future__ import annotations

from pathlib import Path

import jiwer
import pytest
import torch

import phimm
from phimm.pipeline import EMBEDDED_DIR
from phimm.toy import data as toy_data
from phimm.toy.domain import ASR_INSTRUCTION, SPOKEN_VQA_INSTRUCTION

pytestmark = pytest.mark.skipif(not (EMBEDDED_DIR / "config.json").is_file(), reason="no embedded model shipped")

SEED = 424242  # a held-out seed of this test's own


@pytest.fixture(scope="module")
def pipe():
    return phimm.load()


def _user(*parts):
    return phimm.Request(messages=[{"role": "user", "content": list(parts)}])


def _split(kind: str, n: int):
    return list(toy_data.iter_split(kind, n, SEED, heldout=True))


def test_is_the_default_model(pipe):
    assert pipe.name == "embedded"
    assert sorted(pipe.adapters) == ["speech", "vision"]


def test_vqa(pipe):
    samples = _split("vqa", 40)
    outs = pipe([_user({"type": "image", "image": s["image"]}, {"type": "text", "text": s["question"]})
                 for s in samples])
    assert all(o.error is None and o.route.adapter == "vision" for o in outs)
    acc = sum(o.text.strip() == s["answer"] for o, s in zip(outs, samples)) / len(samples)
    assert acc >= 0.75, acc  # chance is about 0.3


def test_asr(pipe):
    samples = _split("asr", 30)
    outs = pipe([_user({"type": "audio", "audio": (s["audio"], s["sample_rate"])},
                       {"type": "text", "text": ASR_INSTRUCTION}) for s in samples])
    assert all(o.error is None and o.route.adapter == "speech" for o in outs)
    wer = jiwer.wer([s["text"] for s in samples], [o.text.strip() or "-" for o in outs])
    assert wer <= 0.3, wer


def test_spoken_question_about_an_image(pipe):
    samples = _split("spoken_vqa", 30)
    outs = pipe([_user({"type": "image", "image": s["image"]}, {"type": "audio", "audio": (s["audio"], s["sample_rate"])},
                       {"type": "text", "text": SPOKEN_VQA_INSTRUCTION}) for s in samples])
    assert all(o.route.adapter == "vision" and o.route.audio_projector == phimm.AudioProjector.VISION_SPEECH
               for o in outs)
    acc = sum(o.text.strip() == s["answer"] for o, s in zip(outs, samples)) / len(samples)
    assert acc >= 0.6, acc


def test_readme_example(pipe):
    """The README's example request, and the one-second budget per request of the embedded model."""
    img = Path(__file__).resolve().parent.parent / "demo" / "examples" / "red_circle_blue_star.png"
    out = pipe(_user({"type": "image", "image": str(img)}, {"type": "text", "text": "what color is the circle"}))
    assert out.text.strip() == "red"
    assert out.route.adapter == "vision"
    assert out.ttft_s < 1.0


def test_text_route_and_bit_identical_without_adapters(pipe):
    base = phimm.load(adapters=[])
    reqs = [_user({"type": "text", "text": "the circle is blue . the square is green . say all shapes :"}),
            _user({"type": "text", "text": "repeat: four seven one ="})]
    with_a = pipe(reqs, output_logits=True, max_new_tokens=8)
    without = base(reqs, output_logits=True, max_new_tokens=8)
    assert with_a[0].route.adapter is None
    for a, b in zip(with_a, without):
        assert a.token_ids == b.token_ids
        assert torch.equal(a.logits, b.logits)
