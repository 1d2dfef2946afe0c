"""Processing: token counts equal transformers' processor's, placeholder forms, chat messages, errors."""

from __future__ import annotations

import numpy as np
import pytest

import phimm
from conftest import make_audio, make_image
from phimm.errors import PlaceholderError, PromptError


@pytest.fixture(scope="module")
def hf_processor(tiny_ckpt):
    from transformers import Phi4MultimodalProcessor

    return Phi4MultimodalProcessor.from_pretrained(str(tiny_ckpt))


@pytest.mark.parametrize("size", [(448, 448), (500, 300), (96, 96), (1000, 200), (300, 900), (1200, 1100)])
def test_image_token_count_equals_transformers(tiny_pipe, hf_processor, size):
    img = make_image(3, size=size)
    ours = tiny_pipe.processor.process_image(img)
    theirs = hf_processor.image_processor(images=[img], return_tensors="pt")
    assert ours.num_tokens == int(theirs["num_img_tokens"][0])
    ids = tiny_pipe.processor.prepare(phimm.Request(prompt="<|image|>x", images=[img])).input_ids
    hf_ids = hf_processor(text="<|endoftext10|>x", images=[img], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == hf_ids


@pytest.mark.parametrize("seconds", [0.05, 0.5, 1.0, 3.7, 12.0])
def test_audio_token_count_equals_transformers(tiny_pipe, hf_processor, seconds):
    wave, sr = make_audio(4, seconds=seconds)
    ours = tiny_pipe.processor.process_audio((wave, sr))
    theirs = hf_processor.audio_processor(wave, sampling_rate=sr, return_tensors="pt")
    assert ours.num_tokens == int(theirs["audio_embed_sizes"][0])
    assert np.allclose(ours.features.numpy(), theirs["audio_input_features"][0].numpy(), atol=1e-5)


def test_audio_any_rate_is_resampled(tiny_pipe):
    w16, _ = make_audio(5, seconds=2.0, rate=16000)
    w44, _ = make_audio(5, seconds=2.0, rate=44100)
    stereo = np.stack([w44, w44], axis=1)
    a = tiny_pipe.processor.process_audio((w16, 16000))
    b = tiny_pipe.processor.process_audio((stereo, 44100))
    assert a.num_tokens == b.num_tokens
    assert abs(b.seconds - 2.0) < 0.01


def test_placeholder_forms_give_same_ids(tiny_pipe, image, audio):
    proc = tiny_pipe.processor
    plain = proc.prepare(phimm.Request(prompt="<|image|><|audio|>what", images=[image], audios=[audio]))
    numbered = proc.prepare(phimm.Request(prompt="<|image_1|><|audio_1|>what", images=[image], audios=[audio]))
    prepended = proc.prepare(phimm.Request(prompt="what", images=[image], audios=[audio]))
    assert plain.input_ids == numbered.input_ids == prepended.input_ids
    assert plain.route_input.num_images == 1 and plain.route_input.num_audios == 1


def test_numbered_placeholders_reorder_media(tiny_pipe):
    small, big = make_image(1, size=(100, 100)), make_image(2, size=(900, 500))
    proc = tiny_pipe.processor
    a = proc.prepare(phimm.Request(prompt="<|image_2|> and <|image_1|>", images=[small, big]))
    b = proc.prepare(phimm.Request(prompt="<|image|> and <|image|>", images=[big, small]))
    assert a.input_ids == b.input_ids
    assert [i.num_tokens for i in a.images] == [i.num_tokens for i in b.images]


@pytest.mark.parametrize(
    "prompt,n_images,match",
    [
        ("<|image|><|image|>x", 1, "2 image placeholder"),
        ("<|image|>x", 2, "1 image placeholder"),
        ("<|image_1|><|image|>x", 2, "mixes numbered"),
        ("<|image_2|>x", 1, "number 1..1"),
        ("<|image_1|><|image_1|>x", 2, "each once"),
    ],
)
def test_placeholder_mismatch_is_an_error(tiny_pipe, prompt, n_images, match):
    imgs = [make_image(i, size=(64, 64)) for i in range(n_images)]
    with pytest.raises(PlaceholderError, match=match):
        tiny_pipe.processor.prepare(phimm.Request(prompt=prompt, images=imgs))


def test_audio_placeholder_without_audio(tiny_pipe):
    with pytest.raises(PlaceholderError, match="audio"):
        tiny_pipe(phimm.Request(prompt="<|audio|> transcribe"))


def test_chat_messages_with_content_parts(tiny_pipe, image, audio):
    msgs = [
        {"role": "system", "content": "you answer in one word"},
        {"role": "user", "content": [
            {"type": "image", "image": image},
            {"type": "audio", "audio": {"array": audio[0], "sampling_rate": audio[1]}},
            {"type": "text", "text": "answer the spoken question about the image"},
        ]},
    ]
    prep = tiny_pipe.processor.prepare(phimm.Request(messages=msgs))
    text = ("<|system|>you answer in one word<|end|><|user|><|image|><|audio|>"
            "answer the spoken question about the image<|end|><|assistant|>")
    same = tiny_pipe.processor.prepare(phimm.Request(prompt=text, images=[image], audios=[audio]))
    assert prep.input_ids == same.input_ids
    out = tiny_pipe(phimm.Request(messages=msgs), max_new_tokens=2)
    assert out.route.adapter == "vision" and str(out.route) == "vision+vision_speech"


@pytest.mark.parametrize(
    "req,match",
    [
        (phimm.Request(), "needs a prompt or messages"),
        (phimm.Request(prompt=""), "empty"),
        (phimm.Request(prompt="x", messages=[{"role": "user", "content": "y"}]), "not both"),
        (phimm.Request(messages=[]), "non-empty"),
        (phimm.Request(messages=[{"content": "x"}]), "role"),
        (phimm.Request(messages=[{"role": "user", "content": [{"type": "video", "video": 1}]}]), "video"),
        (phimm.Request(prompt=3), "string"),
    ],
)
def test_bad_prompts(tiny_pipe, req, match):
    with pytest.raises(PromptError, match=match):
        tiny_pipe(req)


def test_encoded_media_are_processed_once_while_cached(tiny_pipe):
    """The same encoded file (bytes, as a server decodes them) is decoded and transformed once: a repeat gets the
    same processed object; other bytes, media not given as bytes, and bad files are not served from the cache;
    the cache stays within its byte limit, and a copy for another process starts empty."""
    import io
    import pickle

    import soundfile as sf
    import torch

    from phimm.errors import ImageError, MediaError
    from phimm.processor import MediaCache
    from phimm.types import tensor_nbytes

    proc = tiny_pipe.processor
    saved = proc.media_cache
    proc.media_cache = cache = MediaCache()
    try:
        def png(seed):
            buf = io.BytesIO()
            make_image(seed).save(buf, format="PNG")
            return buf.getvalue()

        buf = io.BytesIO()
        sf.write(buf, *make_audio(1), format="WAV")
        wav = buf.getvalue()
        first = proc.prepare(phimm.Request(prompt="<|image|><|audio|>what", images=[png(0)], audios=[wav]))
        again = proc.prepare(phimm.Request(prompt="<|image|><|audio|>what", images=[png(0)], audios=[wav]))
        assert (cache.misses, cache.hits) == (2, 2)
        assert again.images[0] is first.images[0] and again.audios[0] is first.audios[0]
        assert again.input_ids == first.input_ids
        fresh = proc.process_image(png(0))  # what the processor makes without the cache
        assert torch.equal(fresh.pixel_values, first.images[0].pixel_values) and fresh.size == first.images[0].size
        other = proc.prepare(phimm.Request(prompt="<|image|>what", images=[png(1)]))
        assert other.images[0] is not first.images[0] and cache.misses == 3
        proc.prepare(phimm.Request(prompt="<|image|>what", images=[make_image(0)]))  # a PIL image: not cached
        assert (cache.misses, cache.hits) == (3, 2)
        for _ in range(2):  # bad bytes fail every time
            with pytest.raises((ImageError, MediaError)):
                proc.prepare(phimm.Request(prompt="<|image|>what", images=[b"not an image"]))
        assert len(cache.entries) == 3
        # the byte limit: room for about one image's tensors
        one = tensor_nbytes(first.images[0])
        cache.max_bytes = one + 1
        proc.prepare(phimm.Request(prompt="<|image|>what", images=[png(2)]))
        assert cache.nbytes <= cache.max_bytes and len(cache.entries) == 1
        copy = pickle.loads(pickle.dumps(cache))
        assert copy.entries == {} and copy.max_bytes == cache.max_bytes
    finally:
        proc.media_cache = saved
