"""Property-based fuzzing of phimm.media: random bytes, mutated real files, random arrays / dtypes / shapes /
rates and random Python objects. Whatever the input, the loaders either return a well-formed result or raise a
`phimm.errors.PhimmError`; any other exception escaping is a bug in the loader.

The number of cases run is printed at the end of the module ("media fuzz cases: ..."); set
PHIMM_FUZZ_EXAMPLES to run more (or fewer) examples per test."""

from __future__ import annotations

import collections
import io
import math
import os
import struct

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from phimm.errors import PhimmError
from phimm.media import MAX_AUDIO_SECONDS, MAX_IMAGE_PIXELS, audio_duration, describe, load_audio, load_image

torch.set_num_threads(1)

COUNTS: collections.Counter[str] = collections.Counter()
# examples per fuzz test: a few seconds each by default; PHIMM_FUZZ_EXAMPLES=20000 for a longer campaign
EXAMPLES = int(os.environ.get("PHIMM_FUZZ_EXAMPLES", "800"))
FUZZ = settings(deadline=None, max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow], print_blob=True)


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    examples = sum(v for k, v in COUNTS.items() if k.startswith("example:"))
    calls = {k: v for k, v in COUNTS.items() if not k.startswith("example:") and not k.endswith(":ok")}
    line = (f"media fuzz cases: {examples} examples, {sum(calls.values())} loader calls; "
            + ", ".join(f"{k}={v} ({COUNTS[k + ':ok']} ok)" for k, v in sorted(calls.items())))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(line)
    else:
        print(line)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media_fuzz")


# ------------------------------------------------------------------------------------------------ checks


def _check_image(fn, key: str) -> None:
    COUNTS[key] += 1
    try:
        out = fn()
    except PhimmError:
        return
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.width >= 1 and out.height >= 1
    assert getattr(out, "fp", None) is None
    COUNTS[key + ":ok"] += 1


def _check_audio(fn, key: str) -> np.ndarray | None:
    COUNTS[key] += 1
    try:
        out = fn()
    except PhimmError:
        return None
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.ndim == 1 and out.size >= 1
    assert np.isfinite(out).all()
    COUNTS[key + ":ok"] += 1
    return out


# ------------------------------------------------------------------------------------------------ seeds


def _image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    seeds = []
    for im, fmt, kw in [
        (rgb, "PNG", {}),
        (rgb.convert("RGBA"), "PNG", {}),
        (rgb.convert("P"), "PNG", {"transparency": 0}),
        (Image.fromarray(rng.integers(0, 65536, (4, 3), dtype=np.uint16)), "PNG", {}),
        (rgb, "JPEG", {"quality": 80}),
        (rgb, "JPEG", {"progressive": True}),
        (rgb.convert("P"), "GIF", {}),
        (rgb, "BMP", {}),
        (rgb.convert("CMYK"), "TIFF", {}),
        (rgb, "WEBP", {}),
        (rgb, "PPM", {}),
        (rgb, "TGA", {}),
    ]:
        buf = io.BytesIO()
        try:
            im.save(buf, fmt, **kw)
        except (OSError, KeyError, ValueError):  # a codec this Pillow lacks
            continue
        seeds.append(buf.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", exif=exif.tobytes())
    seeds.append(buf.getvalue())
    return seeds


def _audio_seeds() -> list[bytes]:
    t = np.arange(400) / 8000
    mono = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo = np.stack([mono, -mono], axis=1)
    seeds = []
    for data, rate, fmt, subtype in [
        (mono, 8000, "WAV", "PCM_16"),
        (mono, 8000, "WAV", "PCM_U8"),
        (mono, 22050, "WAV", "PCM_24"),
        (stereo, 44100, "WAV", "FLOAT"),
        (mono, 16000, "FLAC", "PCM_16"),
        (np.tile(mono, 8), 16000, "OGG", "VORBIS"),
        (mono, 11025, "AIFF", "PCM_16"),
        (mono, 8000, "AU", "ULAW"),
    ]:
        buf = io.BytesIO()
        sf.write(buf, data, rate, format=fmt, subtype=subtype)
        seeds.append(buf.getvalue())
    return seeds


IMAGE_SEEDS = _image_seeds()
AUDIO_SEEDS = _audio_seeds()


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A real file with a few bytes changed, a slice removed or duplicated, or cut short."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "dup", "truncate", "int32"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[i] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, 1]))
        elif kind == "cut":
            del data[i : i + draw(st.integers(1, 64))]
        elif kind == "dup":
            data[i:i] = data[i : i + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[i:]
        else:  # a header field (size, rate, count) set to an extreme value
            v = draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0x10000, 48000, 3]))
            data[i : i + 4] = struct.pack("<I", v)
    return bytes(data)


IMAGE_MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
               b"RIFF\x00\x01\x00\x00WEBPVP8 ", b"P6\n", b"\x00\x00\x01\x00"]
AUDIO_MAGIC = [b"", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"OggS\x00\x02", b"FORM\x00\x00\x00\x20AIFF",
               b"ID3\x03\x00", b".snd", b"\xff\xfb"]


def _prefixed(magic: list[bytes]):
    return st.builds(lambda m, tail: m + tail, st.sampled_from(magic), st.binary(max_size=300))


# ------------------------------------------------------------------------------------------------ images


@FUZZ
@given(data=st.one_of(_prefixed(IMAGE_MAGIC), mutated(IMAGE_SEEDS)), as_file=st.booleans())
def test_fuzz_image_bytes_and_files(fuzz_dir, data, as_file):
    COUNTS["example:test_fuzz_image_bytes_and_files"] += 1
    if as_file:
        path = fuzz_dir / "fuzz.png"
        path.write_bytes(data)
        _check_image(lambda: load_image(path), "image_file")
    else:
        _check_image(lambda: load_image(data), "image_bytes")


_IMAGE_DTYPES = [np.uint8, np.uint16, np.bool_, np.float16, np.float32, np.float64, np.uint8, np.uint16, np.float32,
                 np.int8, np.int16, np.int32, np.int64, np.uint32, np.complex64]


def _valid_image_shapes():
    side = st.integers(1, 6)
    return st.one_of(st.tuples(side, side), st.tuples(side, side, st.sampled_from([1, 3, 4])),
                     st.tuples(st.sampled_from([1, 3, 4]), side, side))


def _valid_audio_shapes():
    n = st.integers(1, 40)
    ch = st.integers(1, 8)
    return st.one_of(st.tuples(n), st.tuples(n, ch), st.tuples(ch, n))


@st.composite
def any_array(draw, dtypes, valid_shapes, max_dims: int, max_side: int, lo: float, hi: float):
    """Half the time a well-formed array (valid shape, floats in [lo, hi]), otherwise anything: any shape
    (0-d, empty, too many dims), any values (NaN, inf, huge), numpy or torch."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    if draw(st.booleans()):
        shape = draw(valid_shapes)
        elements = st.floats(lo, hi, width=dtype.itemsize * 8) if dtype.kind == "f" else None
    else:
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side))
        elements = None
    arr = draw(hnp.arrays(dtype, shape, elements=elements))
    if draw(st.booleans()):
        try:
            return torch.from_numpy(arr)
        except TypeError:  # a dtype torch cannot hold
            return arr
    return arr


@FUZZ
@given(arr=any_array(_IMAGE_DTYPES, _valid_image_shapes(), max_dims=4, max_side=6, lo=0.0, hi=1.0),
       max_pixels=st.one_of(st.just(MAX_IMAGE_PIXELS), st.none(), st.integers(-1, 40)))
def test_fuzz_image_arrays(arr, max_pixels):
    COUNTS["example:test_fuzz_image_arrays"] += 1
    _check_image(lambda: load_image(arr, max_pixels=max_pixels if max_pixels != 0 else None), "image_array")


PIL_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I",
             "I;16", "I;16L", "I;16B", "I;16N", "F"]


@FUZZ
@given(mode=st.sampled_from(PIL_MODES), w=st.integers(0, 5), h=st.integers(0, 5), data=st.data(),
       transparency=st.one_of(st.none(), st.integers(0, 255), st.tuples(st.integers(0, 255), st.integers(0, 255),
                                                                        st.integers(0, 255))),
       orientation=st.one_of(st.none(), st.integers(0, 9)))
def test_fuzz_pil_images(mode, w, h, data, transparency, orientation):
    COUNTS["example:test_fuzz_pil_images"] += 1
    n = len(Image.new(mode, (w, h)).tobytes())
    im = Image.frombytes(mode, (w, h), data.draw(st.binary(min_size=n, max_size=n))) if n else Image.new(mode, (w, h))
    if mode == "P":
        im.putpalette(data.draw(st.binary(min_size=3, max_size=768)))
    if transparency is not None:
        im.info["transparency"] = transparency
    if orientation is not None:
        im.getexif()[0x0112] = orientation
    _check_image(lambda: load_image(im), "pil_image")


# ------------------------------------------------------------------------------------------------ audio


@FUZZ
@given(data=st.one_of(_prefixed(AUDIO_MAGIC), mutated(AUDIO_SEEDS)), as_file=st.booleans())
def test_fuzz_audio_bytes_and_files(fuzz_dir, data, as_file):
    COUNTS["example:test_fuzz_audio_bytes_and_files"] += 1
    src = data
    if as_file:
        src = fuzz_dir / "fuzz.wav"
        src.write_bytes(data)
    _check_audio(lambda: load_audio(src, max_seconds=60), "audio_file" if as_file else "audio_bytes")
    COUNTS["audio_duration"] += 1
    try:
        d = audio_duration(src)
        assert isinstance(d, float) and d >= 0
        COUNTS["audio_duration:ok"] += 1
    except PhimmError:
        pass


_AUDIO_DTYPES = [np.float32, np.float64, np.float16, np.int16, np.int32, np.uint8, np.int8, np.uint16, np.int64,
                 np.float32, np.int16, np.bool_, np.complex64]
_COMMON_RATES = st.sampled_from([8000, 11025, 16000, 22050, 24000, 44100, 48000, 16001])
_RATES = st.one_of(
    _COMMON_RATES,
    _COMMON_RATES,
    st.integers(1, 200_000),
    st.integers(-10, 2_000_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([None, "16000", True, 16000.0, np.int32(8000), np.float64(22050.0), 22050.5]),
)


@FUZZ
@given(arr=any_array(_AUDIO_DTYPES, _valid_audio_shapes(), max_dims=3, max_side=40, lo=-1.0, hi=1.0), rate=_RATES,
       out_rate=st.one_of(st.sampled_from([16000, 16000, 8000, 24000, 44100]), st.integers(-1, 96000)),
       max_seconds=st.one_of(st.none(), st.just(MAX_AUDIO_SECONDS), st.floats(0.0001, 10)),
       min_samples=st.one_of(st.just(1), st.integers(-1, 30)),
       form=st.sampled_from(["tuple", "reversed", "dict"]))
def test_fuzz_audio_arrays(arr, rate, out_rate, max_seconds, min_samples, form):
    COUNTS["example:test_fuzz_audio_arrays"] += 1
    x = {"tuple": (arr, rate), "reversed": (rate, arr), "dict": {"array": arr, "sampling_rate": rate}}[form]
    out = _check_audio(lambda: load_audio(x, sample_rate=out_rate, max_seconds=max_seconds, min_samples=min_samples),
                       "audio_array")
    if out is not None:
        shape = tuple(arr.shape)
        frames = shape[0] if len(shape) == 1 else (max(shape) if min(shape) <= 8 else None)
        r = int(rate)
        assert len(out) == -(-frames * out_rate // r)  # ceil(frames * out / in)
        assert len(out) >= max(min_samples, 1)
        assert audio_duration(x) == pytest.approx(frames / r)


# ------------------------------------------------------------------------------------------------ any object

_KEYS = st.sampled_from(["array", "sampling_rate", "sample_rate", "path", "bytes", "url", "data", "format"])


def _containers(inner):
    return st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner), st.dictionaries(_KEYS, inner, max_size=3))


_OBJECTS = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.binary(max_size=40),
              st.sampled_from([16000, 44100, "data:image/png;base64,iVBORw0KGgo=", "data:,", "/", "."]),
              st.builds(lambda n: np.zeros(n, np.float32), st.integers(0, 20))),
    _containers,
    max_leaves=6,
)


@FUZZ
@given(obj=_OBJECTS)
def test_fuzz_arbitrary_objects(obj):
    COUNTS["example:test_fuzz_arbitrary_objects"] += 1
    assert isinstance(describe(obj), str)
    _check_image(lambda: load_image(obj), "object_image")
    _check_audio(lambda: load_audio(obj), "object_audio")
    COUNTS["object_duration"] += 1
    try:
        d = audio_duration(obj)
        assert isinstance(d, float) and d >= 0 and not math.isnan(d)
        COUNTS["object_duration:ok"] += 1
    except PhimmError:
        pass
