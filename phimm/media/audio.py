"""Loading and validating audio: `load_audio` turns anything audio-like into mono float32 samples at the
requested rate, `audio_duration` tells how long audio is (see `phimm.media` for the choices made).

The steps are usable on their own: `decode_audio` (encoded bytes or a file -> mono samples and their rate),
`mix_down` (channels -> mono) and `resample` (torchaudio's sinc kernel, cached per rate pair, or exact FFT
resampling where that kernel would be huge).

Failures are `AudioError` or, for an object that is not audio-like, `UnsupportedMediaError`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import math
import numbers
import os
from typing import Any, Callable

import numpy as np
import soundfile as sf
import torch

from phimm.errors import AudioError, PhimmError, UnsupportedMediaError

from .sources import (
    _check_file,
    _content_hint,
    _data_uri_bytes,
    _dict_media,
    _file_head,
    _path_text,
    _read_stream,
    _split_pair,
    _to_numpy,
    describe,
)

__all__ = [
    "SAMPLE_RATE",
    "MAX_AUDIO_SECONDS",
    "MAX_SAMPLE_RATE",
    "load_audio",
    "audio_duration",
    "decode_audio",
    "mix_down",
    "resample",
]

SAMPLE_RATE = 16_000
"""The sample rate `load_audio` returns by default (Hz)."""

MAX_AUDIO_SECONDS = 30 * 60.0
"""Default limit on the duration `load_audio` accepts; pass `max_seconds=None` to lift it."""

MAX_SAMPLE_RATE = 1_000_000
"""Sampling rates (of inputs and of the requested output) above this are refused as nonsensical."""

_MAX_RESAMPLE_KERNEL = 1 << 20  # elements of torchaudio's sinc kernel above which the FFT path is used
_AUDIO_INPUTS = (
    "a file path (str or os.PathLike), bytes / bytearray, a binary file object, an (array, sampling_rate) "
    'tuple, or a dict {"array": ..., "sampling_rate": ...} / {"path": ...} / {"bytes": ...} as `datasets` gives'
)
_AUDIO_FORMATS_HINT = "WAV, FLAC, OGG (Vorbis/Opus), MP3, AIFF or another format libsndfile reads"


def _rate(value: Any, what: str, name: str) -> int:
    """A sampling rate as a positive int (ints, integral floats, numpy / 0-d torch scalars)."""
    v = value
    if isinstance(v, (np.ndarray, torch.Tensor, np.generic)) and v.ndim == 0:
        v = v.item()  # numpy / torch scalars; a bool stays a bool and is refused below
    ok = False
    if isinstance(v, bool):
        pass
    elif isinstance(v, numbers.Integral):
        v, ok = int(v), True
    elif isinstance(v, numbers.Real) and math.isfinite(float(v)) and float(v).is_integer():
        v, ok = int(v), True
    if not ok or v <= 0:
        raise AudioError(
            f"{what} of {name} must be a positive integer number of samples per second (Hz), got {value!r}"
        )
    if v > MAX_SAMPLE_RATE:
        raise AudioError(f"{what} of {name} is {v:,} Hz, above the supported maximum of {MAX_SAMPLE_RATE:,} Hz")
    return v


def _frames_channels(shape: tuple[int, ...], name: str) -> tuple[int, int, bool]:
    """(frames, channels, channels_first) of an audio array's shape."""
    if len(shape) == 1:
        return shape[0], 1, False
    if len(shape) == 2:
        r, c = shape
        if r == 0 or c == 0:
            return 0, max(r, c, 1), False
        if min(r, c) > 8:
            raise AudioError(
                f"2-D audio {name} has shape {r}x{c}: phimm cannot tell which axis holds channels (at most 8 "
                "channels are supported); pass [samples, channels] or [channels, samples]"
            )
        return (r, c, False) if c <= r else (c, r, True)
    raise AudioError(
        f"audio {name} has {len(shape)} dimensions (shape {tuple(shape)}); pass 1-D mono samples or 2-D "
        "[samples, channels] / [channels, samples] (squeeze batch dimensions first)"
    )


class _AudioBytes(io.BytesIO):
    """Encoded audio in memory for libsndfile's virtual I/O. A seek before the start (corrupt headers ask for
    one) leaves the position unchanged instead of raising inside soundfile's C callback, where the exception
    would only be printed as "Exception ignored"; libsndfile then fails or reads garbage, and either way the
    loader reports the file as unreadable or checks what it decoded."""

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return super().seek(offset, whence)
        except (ValueError, OverflowError):
            return self.tell()


class _Source:
    """Where audio comes from: encoded bytes / a path (`src`), or an array with its rate."""

    def __init__(self, src: Any = None, array: Any = None, rate: int | None = None):
        self.src, self.array, self.rate = src, array, rate


def _audio_source(x: Any, name: str) -> _Source:
    if isinstance(x, (str, os.PathLike)):
        path = _path_text(x, name, "audio", AudioError)
        if path.startswith("data:"):
            return _Source(src=_AudioBytes(_data_uri_bytes(path, name, "audio", AudioError)))
        return _Source(src=_check_file(path, name, "audio", AudioError))
    if isinstance(x, (bytes, bytearray, memoryview)):
        data = bytes(x)
        if not data:
            raise AudioError("audio bytes are empty (0 bytes); pass the bytes of an audio file")
        return _Source(src=_AudioBytes(data))
    if isinstance(x, (np.ndarray, torch.Tensor)):
        raise AudioError(
            f"audio {name} is a bare array without its sampling rate; pass (array, sampling_rate), e.g. "
            "load_audio((wave, 16000)), or {'array': wave, 'sampling_rate': 16000}"
        )
    if isinstance(x, (tuple, list)):
        pair = _split_pair(x) if len(x) == 2 else None
        if pair is None:
            raise AudioError(
                f"audio given as a {type(x).__name__} of {len(x)} items ({name}); a {type(x).__name__} must be "
                "(array, sampling_rate), e.g. (wave, 16000)"
            )
        return _Source(array=pair[0], rate=_rate(pair[1], "sampling_rate", name))
    if isinstance(x, dict):
        if "array" in x:
            for key in ("sampling_rate", "sample_rate"):
                if key in x:
                    return _Source(array=x["array"], rate=_rate(x[key], "sampling_rate", name))
            raise AudioError(f'audio dict {name} has "array" but no "sampling_rate"; add "sampling_rate": <Hz>')
        if isinstance(x.get("data"), str):  # OpenAI-style input_audio: {"data": <base64>, "format": "wav"}
            try:
                data = base64.b64decode("".join(x["data"].split()), validate=True)
            except (binascii.Error, ValueError) as e:
                raise AudioError(f'the "data" of audio dict {name} is not valid base64: {e}') from None
            return _audio_source(data, name)
        inner = _dict_media(x, ("bytes", "path", "url", "data"))
        if inner is None:
            raise AudioError(
                f'audio dict {name} has no usable "array" + "sampling_rate", "bytes", "path" or "url"; pass one of '
                "those"
            )
        return _audio_source(inner, name)
    if callable(getattr(x, "read", None)):
        return _Source(src=_AudioBytes(_read_stream(x, name, "audio", AudioError)))
    raise UnsupportedMediaError(f"cannot use {name} (type {type(x).__qualname__}) as audio; pass {_AUDIO_INPUTS}")


def _soundfile_error(src: Any, name: str, e: Exception) -> AudioError:
    head = src.getvalue()[:64] if isinstance(src, io.BytesIO) else _file_head(src)
    detail = (getattr(e, "error_string", None) or f"{type(e).__name__}: {e}").strip().rstrip(".")
    return AudioError(
        f"{name} is not audio phimm can read{_content_hint(head)}: {detail}; pass audio in {_AUDIO_FORMATS_HINT}"
    )


def _too_long(name: str, seconds: float, max_seconds: float) -> AudioError:
    return AudioError(
        f"audio {name} is {seconds:.2f} s long, over the limit of {max_seconds:g} s (max_seconds); trim or split "
        "it, or pass a larger max_seconds (None for no limit)"
    )


def _empty(name: str) -> AudioError:
    return AudioError(f"audio {name} is empty (0 samples); pass audio with at least one sample")


_READ_BLOCK = 1 << 18  # frames per read: channels are mixed down block by block, so memory stays ~ mono size


def mix_down(samples: np.ndarray) -> np.ndarray:
    """Mono samples of `samples` [frames, channels]: the only channel (a view of it), or the mean of the
    channels, computed in float32 (an overflow gives inf, which the callers refuse)."""
    if samples.shape[1] == 1:
        return samples[:, 0]
    with np.errstate(over="ignore", invalid="ignore"):
        return samples.mean(axis=1, dtype=np.float32)


def _decode_file(src: Any, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Mono float32 samples and rate of an encoded file. The duration is checked from the header before any
    sample is decoded (and again while reading, in case the header lies)."""
    chunks: list[np.ndarray] = []
    nan = inf = total = 0
    try:
        with sf.SoundFile(src) as f:
            frames, rate, channels = f.frames, f.samplerate, f.channels
            if rate <= 0 or channels <= 0:
                raise AudioError(f"audio {name} has a broken header ({rate} Hz, {channels} channels); re-export it")
            if frames == 0:
                raise _empty(name)
            if max_seconds is not None and frames / rate > max_seconds:
                raise _too_long(name, frames / rate, max_seconds)
            while True:
                block = f.read(_READ_BLOCK, dtype="float32", always_2d=True)
                n = block.shape[0]
                if n == 0:
                    break
                total += n
                if max_seconds is not None and total / rate > max_seconds:
                    raise _too_long(name, total / rate, max_seconds)
                if not np.isfinite(block).all():
                    nan += int(np.isnan(block).sum())
                    inf += int(np.isinf(block).sum())
                mono = mix_down(block)  # non-finite blocks are refused below
                chunks.append(mono.copy() if channels == 1 else mono)
                if n < _READ_BLOCK:
                    break
    except PhimmError:
        raise
    except Exception as e:
        raise _soundfile_error(src, name, e) from None
    if total == 0:
        raise _empty(name)
    if nan or inf:
        raise AudioError(
            f"audio {name} contains {nan} NaN and {inf} infinite samples; the file is corrupt: re-export it"
        )
    return (chunks[0] if len(chunks) == 1 else np.concatenate(chunks)), rate


def decode_audio(x: Any, *, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode encoded audio `x` (a path, bytes, a binary file object, a ``data:`` URI, or a dict with "bytes" /
    "path" as `datasets` gives) to `(mono float32 samples, sampling rate)`: channels averaged, not resampled,
    no limit on the duration unless `max_seconds` is given.

    Raises `AudioError` (missing / unreadable / empty / non-finite / too long) or `UnsupportedMediaError`.
    """
    max_seconds = _check_limits(max_seconds, 1)
    name = describe(x)
    source = _audio_source(x, name)
    if source.src is None:
        raise AudioError(
            f"audio {name} is an array of samples, not encoded audio; use load_audio((array, sampling_rate))"
        )
    return _decode_file(source.src, name, max_seconds)


def _array_samples(arr: Any, rate: int, name: str, max_seconds: float | None) -> np.ndarray:
    """Samples [frames, channels] float32 of an in-memory array (duration checked before converting it)."""
    if isinstance(arr, (list, tuple)):
        try:
            arr = np.asarray(arr)
        except Exception as e:
            raise AudioError(f"audio {name} is a list that is not a rectangular array of numbers: {e}") from None
    elif not isinstance(arr, (np.ndarray, torch.Tensor)):
        raise UnsupportedMediaError(
            f"the samples of audio {name} are a {type(arr).__qualname__}; pass a numpy array, a torch tensor or a "
            "list of numbers"
        )
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) == 0:
        raise AudioError(f"audio {name} is a single number, not an array of samples; pass a 1-D array")
    frames, _, channels_first = _frames_channels(shape, name)
    if frames == 0:
        raise _empty(name)
    if max_seconds is not None and frames / rate > max_seconds:
        raise _too_long(name, frames / rate, max_seconds)
    a = _to_numpy(arr, name, "audio", AudioError)
    kind = a.dtype.kind
    if kind in "iu":
        bits = a.dtype.itemsize * 8
        half = float(2 ** (bits - 1))
        a = a.astype(np.float32)
        if kind == "u":
            a -= np.float32(half)  # offset binary: the middle of the range is silence
        a *= np.float32(1.0 / half)
    elif kind == "f":
        nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        if nan or inf:
            bad = np.flatnonzero(~np.isfinite(a.reshape(-1)))[0]
            raise AudioError(
                f"audio {name} contains {nan} NaN and {inf} infinite samples (the first at flat index {bad}); "
                "clean it (e.g. numpy.nan_to_num) or fix what produced it"
            )
        if a.dtype != np.float32:
            with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
                a = a.astype(np.float32)
            if not np.isfinite(a).all():
                raise AudioError(f"audio {name} has samples too large for float32; normalize it to [-1, 1]")
    else:
        raise AudioError(
            f"audio {name} has dtype {a.dtype}; pass float samples in [-1, 1] or integer PCM (int16, int32, "
            "uint8, ...)"
        )
    if a.ndim == 1:
        return a[:, None]
    return a.T if channels_first else a


def _check_limits(max_seconds: Any, min_samples: Any) -> float | None:
    if max_seconds is not None:
        if (
            isinstance(max_seconds, bool)
            or not isinstance(max_seconds, numbers.Real)
            or not float(max_seconds) > 0
        ):
            raise AudioError(f"max_seconds must be a positive number of seconds or None, got {max_seconds!r}")
        max_seconds = float(max_seconds)
    if isinstance(min_samples, bool) or not isinstance(min_samples, numbers.Integral) or min_samples < 1:
        raise AudioError(f"min_samples must be an integer >= 1 (empty audio is always refused), got {min_samples!r}")
    return max_seconds


def load_audio(
    x: Any,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = MAX_AUDIO_SECONDS,
    min_samples: int = 1,
) -> np.ndarray:
    """Load `x` as mono float32 samples at `sample_rate` Hz: a new, writable, 1-D numpy array.

    `x` may be a path (`str` / `os.PathLike`, any format libsndfile reads; ``data:`` URIs too), `bytes`, a
    binary file object, an `(array, sampling_rate)` pair (or `(sampling_rate, array)`), or a dict
    ``{"array", "sampling_rate"}`` / ``{"path"}`` / ``{"bytes"}`` as `datasets` produces (also ``{"url"}`` and
    OpenAI-style ``{"data": <base64>, "format": ...}``). Arrays are numpy
    arrays, torch tensors or lists: 1-D mono or 2-D with at most 8 channels on the smaller axis; integer
    samples are scaled to [-1, 1] by their dtype's range. Channels are averaged; the result is resampled.

    Raises `AudioError` (unreadable / empty / non-finite / too long / shorter than `min_samples` output
    samples / bad rate / bare array without a rate) or `UnsupportedMediaError` (not audio-like).
    """
    sample_rate = _rate(sample_rate, "sample_rate", "the requested output")
    max_seconds = _check_limits(max_seconds, min_samples)
    name = describe(x)
    source = _audio_source(x, name)
    if source.src is not None:
        mono, rate = _decode_file(source.src, name, max_seconds)
    else:
        rate = source.rate
        samples = _array_samples(source.array, rate, name, max_seconds)
        mono = mix_down(samples)  # an overflowing mixdown is refused after resampling
    try:
        out = resample(mono, rate, sample_rate)
    except PhimmError:
        raise
    except Exception as e:
        raise AudioError(
            f"cannot resample audio {name} from {rate} Hz to {sample_rate} Hz: {type(e).__name__}: {e}"
        ) from None
    if not np.isfinite(out).all():  # finite float32 input near its maximum can overflow in the filter
        raise AudioError(
            f"audio {name} overflows float32 when resampled from {rate} Hz to {sample_rate} Hz; normalize its "
            "samples to [-1, 1]"
        )
    if out.shape[0] < min_samples:
        raise AudioError(
            f"audio {name} has {out.shape[0]} samples at {sample_rate} Hz ({out.shape[0] / sample_rate:.4f} s), "
            f"fewer than min_samples={min_samples}; pass longer audio"
        )
    return out


def audio_duration(x: Any) -> float:
    """Duration of audio `x` in seconds (any input `load_audio` accepts). Paths, bytes and files are measured
    from their header without decoding samples; arrays from their shape. Empty audio gives 0.0."""
    name = describe(x)
    source = _audio_source(x, name)
    if source.src is not None:
        try:
            with sf.SoundFile(source.src) as f:
                frames, rate = f.frames, f.samplerate
        except Exception as e:
            raise _soundfile_error(source.src, name, e) from None
        if rate <= 0:
            raise AudioError(f"audio {name} has a broken header ({rate} Hz); re-export it")
        return frames / rate
    arr = source.array
    if isinstance(arr, (list, tuple)):
        try:
            arr = np.asarray(arr)
        except Exception as e:
            raise AudioError(f"audio {name} is a list that is not a rectangular array of numbers: {e}") from None
    if not hasattr(arr, "shape"):
        raise UnsupportedMediaError(f"the samples of audio {name} are a {type(arr).__qualname__}; pass an array")
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) == 0:
        raise AudioError(f"audio {name} is a single number, not an array of samples; pass a 1-D array")
    return _frames_channels(shape, name)[0] / source.rate


# --------------------------------------------------------------------------------------------- resampling


def _kernel_elements(orig: int, new: int) -> int:
    """Size of torchaudio's sinc kernel (default lowpass_filter_width=6, rolloff=0.99) for orig -> new."""
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    width = math.ceil(6 * o / (min(o, n) * 0.99))
    return n * (o + 2 * width)


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A cached torchaudio Resample for the reduced ratio orig:new (building one is ~10x a call)."""
    import torchaudio  # deferred: only needed when rates differ

    return torchaudio.transforms.Resample(orig, new)


def _fft_resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Band-limited resampling by truncating / zero-padding the spectrum; any ratio, no kernel."""
    n_in = x.shape[0]
    n_out = -(-n_in * new // orig)
    spec = torch.fft.rfft(torch.from_numpy(x))
    out = torch.zeros(n_out // 2 + 1, dtype=spec.dtype)
    k = min(spec.shape[0], out.shape[0])
    out[:k] = spec[:k]
    if n_out % 2 == 0 and k == out.shape[0] and n_out < n_in:
        out.imag[-1] = 0.0  # the new Nyquist bin must be real
    y = torch.fft.irfft(out, n=n_out) * (n_out / n_in)
    return y.numpy().astype(np.float32, copy=False)


def resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Mono samples `x` at `orig` Hz resampled to `new` Hz: a new float32 array of ceil(len(x) * new / orig)
    samples (a copy when the rates are equal). Uses torchaudio's `Resample` with its default sinc kernel, cached
    per reduced rate pair, or exact FFT resampling where that kernel would be huge (rates with a tiny common
    divisor, like 16001 -> 16000). The rates are not checked here (`load_audio` checks them)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if orig == new:
        return x.copy()
    g = math.gcd(orig, new)
    if _kernel_elements(orig, new) > _MAX_RESAMPLE_KERNEL:
        return _fft_resample(x, orig, new)
    resampler = _resampler(orig // g, new // g)
    with torch.no_grad():
        y = resampler(torch.from_numpy(x)[None])[0]
    return y.numpy().copy()
