"""phimm.media: loading images and audio from every accepted form, and the typed error (class AND message) for
every way an input can be wrong. All media are made in code under tmp_path."""

from __future__ import annotations

import base64
import io
import math
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, ImageFile

from phimm import media
from phimm.errors import AudioError, ImageError, MediaError, PhimmError, UnsupportedMediaError
from phimm.media import audio_duration, describe, load_audio, load_image

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ helpers


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise_image(w: int = 32, h: int = 24, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(w: int, h: int, bit_depth: int = 1, color_type: int = 0) -> bytes:
    """A PNG whose header claims w x h but whose pixel data is a few bytes: decoding it would fail (or, for a
    real file of that size, allocate gigabytes); only a refusal from the header is fast and clean."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def _tone(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec)) * rate / len(x)


def _wav_bytes(data: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, subtype=subtype, format=fmt)
    return buf.getvalue()


def _raises(fn, cls: type[Exception], *fragments: str) -> PhimmError:
    with pytest.raises(cls) as info:
        fn()
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    assert isinstance(info.value, PhimmError)
    return info.value


# ------------------------------------------------------------------------------------------------ images: inputs


def test_truncated_images_flag_left_alone():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_image_every_input_form_gives_the_same_pixels(tmp_path):
    im = _noise_image()
    png = _encode(im, "PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(png)
    want = np.asarray(im)
    arr_chw = torch.from_numpy(want.copy()).permute(2, 0, 1)
    forms = [im, str(path), path, png, bytearray(png), memoryview(png), io.BytesIO(png), want, want.copy(order="F"),
             arr_chw, arr_chw.permute(1, 2, 0), "data:image/png;base64," + base64.b64encode(png).decode(),
             {"bytes": png, "path": "ignored.png"}, {"path": str(path)}, {"url": str(path)}]
    for form in forms:
        out = load_image(form)
        assert out.mode == "RGB" and out.size == (32, 24), describe(form)
        assert np.array_equal(np.asarray(out), want), describe(form)
        assert out is not form
        assert getattr(out, "fp", None) is None  # fully loaded, holds no file


def test_image_from_open_file_and_lazy_pil(tmp_path):
    path = tmp_path / "a.png"
    _noise_image().save(path)
    with open(path, "rb") as f:
        assert load_image(f).size == (32, 24)
    lazy = Image.open(path)  # not decoded yet
    out = load_image(lazy)
    lazy.close()
    assert np.array_equal(np.asarray(out), np.asarray(_noise_image()))
    path.unlink()  # the result does not depend on the file any more
    assert out.getpixel((0, 0)) == tuple(np.asarray(_noise_image())[0, 0])


def test_one_pixel_image_is_accepted(tmp_path):
    p = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(p)
    out = load_image(p)
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (1, 2, 3)


def test_jpeg_file(tmp_path):
    p = tmp_path / "flat.jpg"
    Image.new("RGB", (16, 16), (200, 100, 50)).save(p, quality=95)
    px = np.asarray(load_image(p)).astype(int)
    assert np.abs(px - [200, 100, 50]).max() <= 3


# ------------------------------------------------------------------------------------------------ images: modes


def test_rgba_composited_on_white(tmp_path):
    im = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 128))
    p = tmp_path / "alpha.png"
    im.save(p)
    out = load_image(p)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white
    r, g, b = out.getpixel((1, 0))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1  # half red over white


def test_la_and_palette_transparency(tmp_path):
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    out = load_image(la)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 0)

    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (768 - 9))
    for x in range(3):
        pal.putpixel((x, 0), x)
    p = tmp_path / "pal.png"
    pal.save(p, transparency=0)
    out = load_image(p)
    assert [out.getpixel((x, 0)) for x in range(3)] == [(255, 255, 255), (0, 0, 255), (0, 255, 0)]
    p2 = tmp_path / "pal.gif"
    pal.save(p2)  # no transparency
    out = load_image(p2)
    assert [out.getpixel((x, 0)) for x in range(3)] == [(255, 0, 0), (0, 0, 255), (0, 255, 0)]


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    want = [0, 1, 128, 255]
    im16 = Image.fromarray(values)
    assert im16.mode.startswith("I;16")
    p = tmp_path / "deep.png"
    im16.save(p)
    assert Image.open(p).mode in ("I;16", "I")  # 16-bit grayscale PNG
    for form in (im16, p, values, torch.from_numpy(values.astype(np.int32)).to(torch.uint16)):
        out = np.asarray(load_image(form))
        assert out.shape == (1, 4, 3)
        assert out[0, :, 0].tolist() == want and (out[..., 0] == out[..., 2]).all(), describe(form)
    im32 = Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32))
    assert im32.mode == "I"
    assert np.asarray(load_image(im32))[0, :, 1].tolist() == [0, 255, 255, 0]


def test_float_mode_images():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert np.asarray(load_image(unit))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32))
    assert np.asarray(load_image(wide))[0, :, 0].tolist() == [0, 100, 255]


def test_cmyk_ycbcr_gray_bilevel(tmp_path):
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    p = tmp_path / "cmyk.tif"
    cmyk.save(p)
    for form in (cmyk, p):
        assert load_image(form).getpixel((0, 0)) == (255, 0, 0)
    ycc = Image.new("RGB", (2, 2), (10, 200, 30)).convert("YCbCr")
    assert np.abs(np.asarray(load_image(ycc)).astype(int) - [10, 200, 30]).max() <= 3
    gray = tmp_path / "gray.png"
    Image.new("L", (3, 2), 77).save(gray)
    assert load_image(gray).getpixel((2, 1)) == (77, 77, 77)
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    out = load_image(bilevel)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


PIL_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I",
             "I;16", "I;16L", "I;16B", "I;16N", "F"]


def test_every_pil_mode_converts_to_rgb():
    for mode in PIL_MODES:
        n = len(Image.new(mode, (3, 2)).tobytes())
        im = Image.frombytes(mode, (3, 2), bytes(range(n)) if mode != "F" else np.full(6, 0.5, "<f4").tobytes())
        out = load_image(im)
        assert out.mode == "RGB" and out.size == (3, 2), mode
    la = Image.new("La", (1, 1), (100, 255))
    assert load_image(la).getpixel((0, 0)) == (100, 100, 100)


def test_closed_pil_image(tmp_path):
    p = tmp_path / "c.png"
    Image.new("RGB", (3, 3)).save(p)
    im = Image.open(p)
    im.close()
    _raises(lambda: load_image(im), ImageError, "was closed before its pixels were loaded")


@pytest.mark.parametrize("orientation, top_color", [(6, (255, 0, 0)), (8, (0, 0, 255)), (1, None)])
def test_exif_orientation_applied(tmp_path, orientation, top_color):
    # stored 40 wide x 20 high: left half red, right half blue
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"rot{orientation}.jpg"
    Image.fromarray(a).save(p, quality=95, exif=exif.tobytes())
    out = load_image(p)
    if top_color is None:
        assert out.size == (40, 20)
        return
    # 6 = the camera was turned clockwise: a viewer rotates 90 degrees clockwise, the left edge becomes the top
    assert out.size == (20, 40)
    top = np.asarray(out)[2:8, 4:16].reshape(-1, 3).mean(0)
    bottom = np.asarray(out)[32:38, 4:16].reshape(-1, 3).mean(0)
    assert np.abs(top - top_color).max() < 20
    assert np.abs(bottom - top_color[::-1]).max() < 20


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert load_image(p).getpixel((0, 0)) == (255, 0, 0)


# ------------------------------------------------------------------------------------------------ images: arrays


def test_image_arrays_accepted():
    hw = np.array([[0, 255]], np.uint8)
    assert load_image(hw).getpixel((1, 0)) == (255, 255, 255)
    assert load_image(hw[:, :, None]).getpixel((0, 0)) == (0, 0, 0)
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 1] = (0, 0, 0, 255)
    out = load_image(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 0)
    assert load_image(np.array([[True, False]])).getpixel((0, 0)) == (255, 255, 255)
    f = np.array([[[0.0, 0.5, 1.0]]], np.float64)
    assert load_image(f).getpixel((0, 0)) == (0, 128, 255)
    assert load_image(np.array([[1.0004, -0.0004]], np.float32)).getpixel((0, 0)) == (255, 255, 255)  # tolerance
    chw = torch.zeros(3, 5, 7)
    chw[0] = 1.0
    assert load_image(chw).size == (7, 5) and load_image(chw).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(chw.to(torch.bfloat16)).getpixel((6, 4)) == (255, 0, 0)
    assert load_image(torch.zeros(5, 7, 3, dtype=torch.uint8)).size == (7, 5)
    assert load_image(np.zeros((3, 5, 7), np.uint8)).size == (7, 5)  # numpy CxHxW when HxWxC can't fit
    assert load_image(np.zeros((6, 5, 3), np.uint8)[::2]).size == (5, 3)  # non-contiguous
    x = torch.zeros(3, 2, 2, requires_grad=True)
    assert load_image(x).size == (2, 2)


# ------------------------------------------------------------------------------------------------ images: errors


def _image_error_cases(tmp: Path):
    good_png = _encode(_noise_image(), "PNG")
    good_jpg = _encode(_noise_image(), "JPEG")
    files = {
        "missing.png": None,
        "zero.png": b"",
        "text.png": b"this is not an image, just some notes\n",
        "page.png": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "half.png": good_png[: len(good_png) // 2],
        "half.jpg": good_jpg[: len(good_jpg) // 2],
        "sig_only.png": good_png[:8],
        "bad_ihdr.png": good_png[:16] + bytes([good_png[16] ^ 0xFF]) + good_png[17:],
        "bad_idat.png": good_png.replace(b"IDAT", b"IDAT" + b"\x00" * 24, 1)[: len(good_png)],
        "bad_header.jpg": good_jpg[:2] + b"\x00" * 40 + good_jpg[42:],
        "sound.png": _wav_bytes(np.zeros(100, np.float32), 8000),
        "zero_width.png": _png_header_only(0, 5, 8),
    }
    for fname, data in files.items():
        if data is not None:
            (tmp / fname).write_bytes(data)
    (tmp / "folder.png").mkdir()
    t = str(tmp)
    return [
        (t + "/missing.png", ImageError, ["not found", "missing.png"]),
        (t + "/folder.png", ImageError, ["is a directory"]),
        (t + "/zero.png", ImageError, ["zero.png", "empty (0 bytes)"]),
        (b"", ImageError, ["empty (0 bytes)"]),
        (io.BytesIO(b""), ImageError, ["empty (0 bytes)", "seek(0)"]),
        (t + "/text.png", ImageError, ["text.png", "not an image", "looks like text"]),
        (t + "/page.png", ImageError, ["HTML"]),
        (t + "/half.png", ImageError, ["half.png", "truncated or corrupt"]),
        (t + "/half.jpg", ImageError, ["half.jpg", "truncated or corrupt"]),
        (t + "/sig_only.png", ImageError, ["PNG image", "truncated or corrupt"]),
        (t + "/bad_ihdr.png", ImageError, ["PNG image", "corrupt"]),
        (t + "/bad_idat.png", ImageError, ["bad_idat.png", "truncated or corrupt"]),
        (t + "/bad_header.jpg", ImageError, ["JPEG image", "corrupt"]),
        (t + "/sound.png", ImageError, ["looks like WAV audio"]),
        (t + "/zero_width.png", ImageError, ["zero_width.png"]),
        (Image.new("RGB", (0, 0)), ImageError, ["0x0", "no pixels"]),
        (Image.new("RGB", (5, 0)), ImageError, ["5x0", "at least 1x1"]),
        (np.zeros((0, 4, 3), np.uint8), ImageError, ["4x0", "no pixels"]),
        (np.zeros(5, np.uint8), ImageError, ["shape (5,)", "HxW"]),
        (np.zeros((2, 2, 2, 3), np.uint8), ImageError, ["shape (2, 2, 2, 3)"]),
        (np.zeros((5, 5, 2), np.uint8), ImageError, ["shape (5, 5, 2)", "HxWx3"]),
        (torch.zeros(5, 4, 6), ImageError, ["shape (5, 4, 6)", "CxHxW"]),
        (np.array([[0.5, np.nan]]), ImageError, ["1 NaN", "finite"]),
        (np.array([[0.5, np.inf]], np.float32), ImageError, ["1 infinite"]),
        (np.full((2, 2), 200.0), ImageError, ["[200, 200]", "must be in [0, 1]", "divide"]),
        (np.zeros((2, 2), np.int64), ImageError, ["dtype int64", "uint8"]),
        (np.zeros((2, 2), np.complex64), ImageError, ["dtype complex64"]),
        (torch.zeros(2, 2, dtype=torch.complex64), ImageError, ["complex"]),
        ("https://example.com/cat.png", ImageError, ["URL", "does not download"]),
        ("", ImageError, ["empty string"]),
        ("data:image/png;base64,!!!", ImageError, ["base64"]),
        ({"caption": "a cat"}, ImageError, ['"bytes", "path" or "url"']),
    ]


def test_image_error_sweep(tmp_path):
    for x, cls, fragments in _image_error_cases(tmp_path):
        try:
            _raises(lambda: load_image(x), cls, *fragments)
        except AssertionError as e:
            raise AssertionError(f"case {describe(x)}: {e}") from None


def test_text_mode_file_object(tmp_path):
    p = tmp_path / "t.png"
    p.write_text("hello")
    with open(p) as f:
        _raises(lambda: load_image(f), ImageError, "binary mode")


@pytest.mark.parametrize("x", [5, 2.5, None, [1, 2], object(), Image])
def test_image_unsupported_types(x):
    e = _raises(lambda: load_image(x), UnsupportedMediaError, f"type {type(x).__qualname__}", "PIL.Image.Image",
                "numpy array", "torch tensor", "bytes")
    assert isinstance(e, TypeError) and isinstance(e, MediaError)


def test_huge_png_header_refused_before_decoding(tmp_path, monkeypatch):
    # 20000 x 20000 = 400 M pixels (1.2 GB as RGB), but the file is ~70 bytes: only the header is ever read
    def no_decoding(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(20000, 20000))
    assert p.stat().st_size < 200
    for form in (p, p.read_bytes()):
        _raises(lambda: load_image(form), ImageError, "64,000,000 pixels", "max_pixels", "refused before decoding")
    # between our limit and Pillow's: our check, with the exact size
    mid = _png_header_only(9000, 9000)
    _raises(lambda: load_image(mid), ImageError, "9000x9000 = 81,000,000 pixels", "limit of 64,000,000 pixels")
    big = _png_header_only(10000, 10000)  # above Pillow's warning threshold: still our message, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _raises(lambda: load_image(big), ImageError, "10000x10000", "limit of 64,000,000")


def test_max_pixels_per_call():
    im = Image.new("RGB", (4, 4))
    _raises(lambda: load_image(im, max_pixels=10), ImageError, "4x4 = 16 pixels", "limit of 10 pixels")
    _raises(lambda: load_image(np.zeros((4, 4), np.uint8), max_pixels=15), ImageError, "limit of 15 pixels")
    assert load_image(im, max_pixels=16).size == (4, 4)
    assert load_image(im, max_pixels=None).size == (4, 4)
    _raises(lambda: load_image(im, max_pixels=0), ImageError, "max_pixels must be a positive integer")


# ------------------------------------------------------------------------------------------------ audio: formats


@pytest.mark.parametrize("subtype, tol", [("PCM_U8", 1 / 64), ("PCM_16", 1e-4), ("PCM_24", 1e-6),
                                          ("PCM_32", 1e-6), ("FLOAT", 1e-7), ("DOUBLE", 1e-7)])
def test_wav_subtypes_keep_amplitude(tmp_path, subtype, tol):
    x = _tone(440, 16000, 0.25)
    p = tmp_path / f"{subtype}.wav"
    sf.write(p, x, 16000, subtype=subtype)
    assert sf.info(str(p)).subtype == subtype
    out = load_audio(p)
    assert out.dtype == np.float32 and out.ndim == 1 and out.shape == x.shape
    assert np.abs(out - x).max() <= tol
    assert abs(np.abs(out).max() - 0.5) <= tol + 1e-3


@pytest.mark.parametrize("fmt, subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_flac_and_ogg(tmp_path, fmt, subtype):
    x = _tone(440, 16000, 0.5)
    p = tmp_path / f"tone.{fmt.lower()}"
    sf.write(p, x, 16000, format=fmt, subtype=subtype)
    out = load_audio(str(p))
    assert abs(len(out) - len(x)) <= 16
    assert abs(_peak_hz(out, 16000) - 440) <= 2
    assert abs(np.sqrt(np.mean(out ** 2)) - 0.5 / math.sqrt(2)) < 0.03


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000])
def test_resampling_keeps_length_and_pitch(tmp_path, rate):
    p = tmp_path / f"tone{rate}.wav"
    sf.write(p, _tone(440, rate, 1.0), rate, subtype="FLOAT")
    out = load_audio(p)
    assert out.dtype == np.float32 and len(out) == 16000  # ceil(n * 16000 / rate), n = rate
    assert abs(_peak_hz(out, 16000) - 440) <= 1.0
    mid = out[2000:-2000]
    assert abs(np.abs(mid).max() - 0.5) < 0.02  # gain kept
    assert audio_duration(p) == pytest.approx(1.0)


def test_resampler_is_cached():
    x = _tone(440, 44100, 0.05)
    load_audio((x, 44100))
    before = media.audio._resampler.cache_info()
    load_audio((x, 44100))
    after = media.audio._resampler.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses


def test_odd_rate_uses_fft_path_and_keeps_pitch():
    assert media.audio._kernel_elements(16001, 16000) > media.audio._MAX_RESAMPLE_KERNEL  # torchaudio would need ~1 GB
    out = load_audio((_tone(440, 16001, 1.0), 16001))
    assert len(out) == 16000 and abs(_peak_hz(out, 16000) - 440) <= 1.0
    assert abs(np.abs(out[2000:-2000]).max() - 0.5) < 0.02
    up = load_audio((_tone(440, 16000, 0.5), 16000), sample_rate=24001)
    assert len(up) == math.ceil(8000 * 24001 / 16000) and abs(_peak_hz(up, 24001) - 440) <= 3


def test_other_output_rate():
    out = load_audio((_tone(440, 44100, 0.5), 44100), sample_rate=8000)
    assert len(out) == 4000 and abs(_peak_hz(out, 8000) - 440) <= 2


# ------------------------------------------------------------------------------------------------ audio: channels


def test_stereo_and_six_channel_mixdown(tmp_path):
    n = 800
    stereo = np.stack([np.full(n, 0.2), np.full(n, 0.6)], axis=1).astype(np.float32)  # [samples, channels]
    p = tmp_path / "stereo.wav"
    sf.write(p, stereo, 16000, subtype="FLOAT")
    for form in (p, (stereo, 16000), (stereo.T, 16000), (torch.from_numpy(stereo.T.copy()), 16000)):
        out = load_audio(form)
        assert out.shape == (n,) and np.allclose(out, 0.4, atol=1e-6), describe(form)
    six = np.stack([np.full(n, 0.1 * k) for k in range(6)], axis=1).astype(np.float32)
    p6 = tmp_path / "six.wav"
    sf.write(p6, six, 16000, subtype="FLOAT")
    assert sf.info(str(p6)).channels == 6
    for form in (p6, (six.T, 16000)):
        out = load_audio(form)
        assert out.shape == (n,) and np.allclose(out, 0.25, atol=1e-6)
    assert load_audio((np.ones((1, 5), np.float32), 16000)).shape == (5,)  # [1, samples]
    assert load_audio((np.ones((5, 1), np.float32), 16000)).shape == (5,)  # [samples, 1]


def test_long_file_read_in_blocks(tmp_path):
    n = media.audio._READ_BLOCK + 1000  # more than one block
    left = np.linspace(-0.5, 0.5, n, dtype=np.float32)
    p = tmp_path / "long_stereo.wav"
    sf.write(p, np.stack([left, -left * 0.5], axis=1), 16000, subtype="FLOAT")
    out = load_audio(p, max_seconds=None)
    assert out.shape == (n,) and np.allclose(out, left * 0.25, atol=1e-7)


# ------------------------------------------------------------------------------------------------ audio: forms


def test_audio_input_forms(tmp_path):
    x = _tone(300, 16000, 0.1)
    wav = _wav_bytes(x, 16000, "FLOAT")
    p = tmp_path / "clip.wav"
    p.write_bytes(wav)
    forms = [p, str(p), wav, bytearray(wav), io.BytesIO(wav), (x, 16000), [x, 16000], (16000, x),
             (x.astype(np.float64), np.int64(16000)), (x, 16000.0), (torch.from_numpy(x), 16000),
             (x.tolist(), 16000), {"array": x, "sampling_rate": 16000}, {"path": str(p), "bytes": None},
             {"bytes": wav, "path": "clip.wav"}, {"url": str(p)}, {"data": base64.b64encode(wav).decode(),
                                                                   "format": "wav"},
             "data:audio/wav;base64," + base64.b64encode(wav).decode(), (x, torch.tensor(16000))]
    for form in forms:
        out = load_audio(form)
        assert out.dtype == np.float32 and out.shape == x.shape, describe(form)
        assert np.allclose(out, x, atol=1e-6), describe(form)
    with open(p, "rb") as f:
        assert load_audio(f).shape == x.shape


def test_result_is_a_fresh_array():
    x = np.zeros(100, np.float32)
    out = load_audio((x, 16000))
    assert out is not x and not np.shares_memory(out, x) and out.flags.writeable
    out[0] = 1.0
    assert x[0] == 0.0


def test_integer_arrays_scaled_by_dtype_range():
    cases = [(np.array([16384, -32768], np.int16), [0.5, -1.0]),
             (np.array([192, 0, 128], np.uint8), [0.5, -1.0, 0.0]),
             (np.array([2 ** 30], np.int32), [0.5]),
             (np.array([64], np.int8), [0.5]),
             (np.array([49152], np.uint16), [0.5])]
    for arr, want in cases:
        assert np.allclose(load_audio((arr, 16000)), want, atol=1e-6), arr.dtype
    assert np.allclose(load_audio((torch.tensor([16384], dtype=torch.int16), 16000)), [0.5])


def test_one_sample_audio_and_min_samples():
    # min_samples counts output samples; the default 1 accepts a single sample
    assert load_audio((np.array([0.25], np.float32), 16000)).tolist() == [0.25]
    assert load_audio((np.array([0.25], np.float32), 44100)).shape == (1,)
    _raises(lambda: load_audio((np.zeros(3, np.float32), 16000), min_samples=4), AudioError,
            "3 samples at 16000 Hz", "fewer than min_samples=4")
    assert load_audio((np.zeros(4, np.float32), 16000), min_samples=4).shape == (4,)


def test_max_seconds_per_call_and_default(tmp_path, monkeypatch):
    _raises(lambda: load_audio((np.zeros(16000, np.float32), 8000), max_seconds=1), AudioError,
            "2.00 s long", "over the limit of 1 s", "max_seconds")
    assert load_audio((np.zeros(16000, np.float32), 8000), max_seconds=None).shape == (32000,)
    assert media.MAX_AUDIO_SECONDS == 1800
    # 1900 s at 100 Hz: a small file over the default limit, refused from its header (read() never called)
    p = tmp_path / "long.wav"
    sf.write(p, np.zeros(190_000, np.int16), 100, subtype="PCM_16")

    def no_decoding(*a, **k):
        raise AssertionError("samples were decoded")

    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    _raises(lambda: load_audio(p), AudioError, "long.wav", "1900.00 s long", "over the limit of 1800 s")
    assert audio_duration(p) == pytest.approx(1900.0)  # from the header


def test_audio_duration_forms(tmp_path):
    x = np.zeros((2, 8000), np.float32)
    assert audio_duration((x, 16000)) == 0.5
    assert audio_duration({"array": x.T, "sampling_rate": 8000}) == 1.0
    assert audio_duration((torch.zeros(4000), 8000)) == 0.5
    wav = _wav_bytes(np.zeros(4410, np.float32), 44100)
    assert audio_duration(wav) == pytest.approx(0.1)
    assert audio_duration({"bytes": wav, "path": None}) == pytest.approx(0.1)
    _raises(lambda: audio_duration(np.zeros(5)), AudioError, "sampling rate")
    _raises(lambda: audio_duration(b"plain text, no audio"), AudioError, "looks like text")


# ------------------------------------------------------------------------------------------------ audio: errors


def _audio_error_cases(tmp: Path):
    nan = np.zeros(10, np.float32)
    nan[3] = np.nan
    inf = np.zeros((10, 2), np.float32)
    inf[4, 1] = -np.inf
    files = {
        "zero.wav": b"",
        "notes.wav": b"RIFF? no: these are meeting notes, saved with the wrong name\n",
        "picture.wav": _encode(Image.new("RGB", (2, 2)), "PNG"),
        "empty.wav": _wav_bytes(np.zeros((0,), np.float32), 16000),
        "nan.wav": _wav_bytes(nan, 16000, "FLOAT"),
        "cut.wav": _wav_bytes(np.zeros(100, np.float32), 16000)[:30],
    }
    for fname, data in files.items():
        (tmp / fname).write_bytes(data)
    (tmp / "dir.wav").mkdir()
    t = str(tmp)
    return [
        (t + "/missing.wav", AudioError, ["not found", "missing.wav"]),
        (t + "/dir.wav", AudioError, ["is a directory"]),
        (t + "/zero.wav", AudioError, ["zero.wav", "empty (0 bytes)"]),
        (b"", AudioError, ["empty (0 bytes)"]),
        (t + "/notes.wav", AudioError, ["notes.wav", "not audio", "looks like text"]),
        (t + "/picture.wav", AudioError, ["looks like a PNG image"]),
        (t + "/empty.wav", AudioError, ["empty.wav", "empty (0 samples)"]),
        (t + "/nan.wav", AudioError, ["nan.wav", "1 NaN"]),
        (t + "/cut.wav", AudioError, ["cut.wav", "not audio"]),
        ((np.zeros(0, np.float32), 16000), AudioError, ["empty (0 samples)"]),
        ((np.zeros((0, 2), np.float32), 16000), AudioError, ["empty (0 samples)"]),
        ({"array": [], "sampling_rate": 16000}, AudioError, ["empty (0 samples)"]),
        ((nan, 16000), AudioError, ["1 NaN", "first at flat index 3"]),
        ((inf, 16000), AudioError, ["1 infinite"]),
        ((torch.tensor([0.0, float("nan")]), 16000), AudioError, ["1 NaN"]),
        (np.zeros(100, np.float32), AudioError, ["without its sampling rate", "(array, sampling_rate)"]),
        (torch.zeros(100), AudioError, ["(array, sampling_rate)"]),
        ((np.zeros(10), 0), AudioError, ["positive integer", "got 0"]),
        ((np.zeros(10), -16000), AudioError, ["positive integer"]),
        ((np.zeros(10), 16000.5), AudioError, ["positive integer", "16000.5"]),
        ((np.zeros(10), float("nan")), AudioError, ["positive integer"]),
        ((np.zeros(10), True), AudioError, ["positive integer", "True"]),
        ({"array": np.zeros(10), "sampling_rate": "16000"}, AudioError, ["positive integer", "'16000'"]),
        ({"array": np.zeros(10), "sampling_rate": None}, AudioError, ["positive integer", "None"]),
        ((np.zeros(10), 10 ** 9), AudioError, ["above the supported maximum"]),
        ((np.zeros((2, 3, 4)), 16000), AudioError, ["3 dimensions", "squeeze"]),
        ((np.zeros((10, 12)), 16000), AudioError, ["10x12", "which axis holds channels"]),
        ((np.zeros(10, bool), 16000), AudioError, ["dtype bool"]),
        ((np.zeros(10, np.complex64), 16000), AudioError, ["dtype complex64"]),
        ((np.array(["a", "b"]), 16000), AudioError, ["dtype <U1"]),
        ((np.float32(0.5), 16000), AudioError, ["(array, sampling_rate)"]),
        ((np.zeros(10), 16000, "extra"), AudioError, ["tuple of 3 items", "(array, sampling_rate)"]),
        ({"array": np.zeros(10)}, AudioError, ['no "sampling_rate"']),
        ({"text": "hello"}, AudioError, ['"array" + "sampling_rate"', '"path"']),
        ({"data": "%%%", "format": "wav"}, AudioError, ["not valid base64"]),
        (([[0.1, 0.2], [0.3]], 16000), AudioError, ["not a rectangular array"]),
        (("abc", 16000), UnsupportedMediaError, ["str", "numpy array"]),
        ("http://example.com/a.wav", AudioError, ["does not download"]),
    ]


def test_audio_error_sweep(tmp_path):
    for x, cls, fragments in _audio_error_cases(tmp_path):
        try:
            _raises(lambda: load_audio(x), cls, *fragments)
        except AssertionError as e:
            raise AssertionError(f"case {describe(x)}: {e}") from None


def test_infinite_float_wav(tmp_path):
    x = np.zeros(10, np.float32)
    x[2] = np.inf
    p = tmp_path / "inf.wav"
    p.write_bytes(_wav_bytes(x, 16000, "FLOAT"))
    _raises(lambda: load_audio(p), AudioError, "1 infinite")


def test_bad_call_options():
    x = (np.zeros(10, np.float32), 16000)
    _raises(lambda: load_audio(x, sample_rate=0), AudioError, "sample_rate", "positive integer")
    _raises(lambda: load_audio(x, max_seconds=-1), AudioError, "max_seconds must be a positive number")
    _raises(lambda: load_audio(x, max_seconds=float("nan")), AudioError, "max_seconds")
    _raises(lambda: load_audio(x, min_samples=0), AudioError, "min_samples must be an integer >= 1")


@pytest.mark.parametrize("x", [5, None, 1.5, object(), Image.new("RGB", (2, 2))])
def test_audio_unsupported_types(x):
    e = _raises(lambda: load_audio(x), UnsupportedMediaError, f"type {type(x).__qualname__}", "(array, sampling_rate)",
                "file path")
    assert isinstance(e, TypeError)


# ------------------------------------------------------------------------------------------------ describe


def test_describe():
    assert describe("image.png") == "image.png"
    assert describe(Path("dir/clip.wav")) == os.path.join("dir", "clip.wav")
    assert describe(np.zeros((3, 4), np.uint8)) == "<array 3x4 uint8>"
    assert describe(torch.zeros(3, 8, 8)) == "<tensor 3x8x8 float32>"
    assert describe(b"1234") == "<4 bytes>"
    assert describe((np.zeros(16000, np.float32), 16000)) == "<array 16000 float32 at 16000 Hz>"
    assert describe({"array": np.zeros(5), "sampling_rate": 8000}) == "<array 5 float64 at 8000 Hz>"
    assert describe({"path": "a.wav", "bytes": b"xx"}) == "a.wav"
    assert describe(Image.new("RGB", (2, 3))) == "<PIL image 2x3 RGB>"
    assert describe(5) == "<int 5>"
    assert describe(io.BytesIO()) == "<BytesIO file object>"
    assert describe("data:image/png;base64,AAAA").startswith("<data URI image/png;base64")
    assert len(describe("x" * 1000)) <= 161

    class Weird:
        @property
        def shape(self):
            raise RuntimeError

    assert describe(Weird()) == "<Weird>"
