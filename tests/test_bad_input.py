"""Bad input through the whole pipeline: a typed error for the request at fault, nothing else lost."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import phimm
from conftest import make_audio, make_image
from phimm.errors import (AudioError, CheckpointError, GenerationConfigError, ImageError, PhimmError,
                          PlaceholderError, PromptError, UnknownAdapterError, UnsafeCheckpointError,
                          UnsupportedMediaError)


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    png = _png_bytes(make_image(0, size=(64, 64)))
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("definitely not an image\n")
    (d / "text.wav").write_text("RIFF? no, just words\n")
    (d / "empty.wav").write_bytes(b"")
    sf.write(d / "silent0.wav", np.zeros(0, dtype=np.float32), 16000)
    return d


def _bad_requests(d):
    nan = np.full(16000, np.nan, dtype=np.float32)
    return {
        "truncated png": (phimm.Request(prompt="x", images=[d / "truncated.png"]), ImageError, "truncated"),
        "zero-byte png": (phimm.Request(prompt="x", images=[d / "empty.png"]), ImageError, "empty"),
        "text named .png": (phimm.Request(prompt="x", images=[d / "text.png"]), ImageError, "text.png"),
        "text named .wav": (phimm.Request(prompt="x", audios=[d / "text.wav"]), AudioError, "text.wav"),
        "zero-byte wav": (phimm.Request(prompt="x", audios=[d / "empty.wav"]), AudioError, "empty"),
        "no samples": (phimm.Request(prompt="x", audios=[d / "silent0.wav"]), AudioError, "0 samples"),
        "nan audio": (phimm.Request(prompt="x", audios=[(nan, 16000)]), AudioError, "NaN"),
        "1-sample audio": (phimm.Request(prompt="x", audios=[(np.zeros(1, np.float32), 16000)]), AudioError, "samples"),
        "too many placeholders": (phimm.Request(prompt="<|image|><|image|>x", images=[make_image(1, (64, 64))]),
                                  PlaceholderError, "2 image placeholder"),
        "too few placeholders": (phimm.Request(prompt="<|audio|>x", audios=[make_audio(1), make_audio(2)]),
                                 PlaceholderError, "1 audio placeholder"),
        "unknown adapter": (phimm.Request(prompt="x", adapter="tamil"), UnknownAdapterError, "tamil"),
        "empty prompt": (phimm.Request(prompt="   "), PromptError, "empty"),
        "unsupported media type": (phimm.Request(prompt="x", images=[12345]), UnsupportedMediaError, "int"),
    }


@pytest.mark.parametrize("case", [
    "truncated png", "zero-byte png", "text named .png", "text named .wav", "zero-byte wav", "no samples",
    "nan audio", "1-sample audio", "too many placeholders", "too few placeholders", "unknown adapter",
    "empty prompt", "unsupported media type"])
def test_single_bad_request_raises_typed_error(tiny_pipe, bad_files, case):
    req, err, fragment = _bad_requests(bad_files)[case]
    with pytest.raises(err) as info:
        tiny_pipe(req, max_new_tokens=2)
    assert isinstance(info.value, PhimmError)
    assert fragment.lower() in str(info.value).lower(), str(info.value)


def test_bad_rows_do_not_take_the_batch_down(tiny_pipe, bad_files):
    good = [phimm.Request(prompt="hello"), phimm.Request(prompt="<|image|>x", images=[make_image(2)]),
            phimm.Request(prompt="<|audio|>x", audios=[make_audio(3)]),
            phimm.Request(prompt="<|image|><|audio|>x", images=[make_image(4)], audios=[make_audio(4)])]
    bad = [r for r, _, _ in _bad_requests(bad_files).values()]
    mixed = []
    for i in range(max(len(good), len(bad))):
        if i < len(bad):
            mixed.append(("bad", bad[i]))
        if i < len(good):
            mixed.append(("good", good[i]))
    outs = tiny_pipe([r for _, r in mixed], max_new_tokens=4, output_logits=True)
    assert len(outs) == len(mixed)
    for (kind, req), out in zip(mixed, outs):
        if kind == "bad":
            assert isinstance(out.error, PhimmError) and out.text == "" and out.token_ids == []
            assert out.finish_reason == "error"
        else:
            alone = tiny_pipe(req, max_new_tokens=4, output_logits=True)
            assert out.error is None and out.token_ids == alone.token_ids
            assert (out.logits - alone.logits).abs().max().item() < 1e-5


def test_all_rows_bad_returns_only_errors(tiny_pipe, bad_files):
    outs = tiny_pipe([r for r, _, _ in list(_bad_requests(bad_files).values())[:3]])
    assert all(o.error is not None for o in outs)


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"max_new_tokens": -1}, {"top_p": 2.0}])
def test_bad_generation_options_fail_before_compute(tiny_pipe, kwargs):
    with pytest.raises(GenerationConfigError):
        tiny_pipe(["hello", "there"], **kwargs)


def test_decompression_bomb_refused_before_decoding(tiny_pipe, tmp_path):
    # a 20000 x 20000 1-bit PNG is small on disk; refusing it must not decode 400M pixels
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png", optimize=True)
    with pytest.raises(ImageError, match="pixels"):
        tiny_pipe(phimm.Request(prompt="x", images=[tmp_path / "bomb.png"]))


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16", "CMYK", "1"])
def test_image_modes_are_converted(tiny_pipe, mode):
    img = make_image(6, size=(120, 90)).convert(mode)
    out = tiny_pipe(phimm.Request(prompt="x", images=[img]), max_new_tokens=1)
    assert out.error is None and out.route.adapter == "vision"


@pytest.mark.parametrize("rate,channels", [(8000, 1), (22050, 2), (44100, 6), (48000, 1)])
def test_audio_rates_and_channels(tiny_pipe, tmp_path, rate, channels):
    wave, _ = make_audio(7, seconds=1.0, rate=rate)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    for subtype in ("PCM_U8" if channels == 1 else "PCM_16", "PCM_24", "FLOAT"):
        f = tmp_path / f"a_{subtype}.wav"
        sf.write(f, data, rate, subtype=subtype)
        prep = tiny_pipe.processor.process_audio(f)
        assert abs(prep.seconds - 1.0) < 0.01
    out = tiny_pipe(phimm.Request(prompt="x", audios=[f]), max_new_tokens=1)
    assert out.error is None


def test_audio_longer_than_one_encoder_chunk(tiny_pipe):
    # 45 s -> 563 audio tokens: more than the conformer's 500-frame attention window, which it splits as the
    # reference does
    wave, sr = make_audio(8, seconds=45.0)
    out = tiny_pipe(phimm.Request(prompt="<|audio|>transcribe", audios=[(wave, sr)]), max_new_tokens=1)
    assert out.error is None and out.prompt_tokens > 560


def test_pickle_checkpoint_refused(tiny_ckpt, tmp_path):
    ck = tmp_path / "pickled"
    shutil.copytree(tiny_ckpt, ck)
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(ck / "model.safetensors"), ck / "pytorch_model.bin")
    (ck / "model.safetensors").unlink()
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        phimm.load(ck)
    pipe = phimm.load(ck, allow_pickle=True)  # explicit opt-in: torch.load(weights_only=True) underneath
    assert pipe("hello", max_new_tokens=1).error is None


def test_config_paths_cannot_escape_the_checkpoint(tiny_ckpt, tmp_path):
    ck = tmp_path / "escape"
    shutil.copytree(tiny_ckpt, ck)
    (ck / "phimm.json").write_text(json.dumps({"format_version": 1, "adapters": {"vision": "../../etc"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        phimm.load(ck)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.lists(st.sampled_from(list("ab <|>_12") + ["<|image|>", "<|audio|>", "<|image_1|>", "<|audio_2|>",
                                                         "<|endoftext10|>"]), max_size=12).map("".join),
    n_images=st.integers(0, 2),
    n_audios=st.integers(0, 2),
)
def test_fuzz_prompts_and_media_counts(tiny_pipe, prompt, n_images, n_audios):
    images = [make_image(i, size=(40, 40)) for i in range(n_images)]
    audios = [make_audio(i, seconds=0.1) for i in range(n_audios)]
    try:
        tiny_pipe.processor.prepare(phimm.Request(prompt=prompt, images=images, audios=audios))
    except PhimmError:
        pass  # the only kind of exception allowed out
