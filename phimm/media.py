"""Loading and validating images and audio.

`load_image` turns anything image-like (a PIL image, a path, bytes, a binary file object, a numpy array or a
torch tensor) into a fully decoded RGB `PIL.Image.Image`, oriented as a viewer shows it. `load_audio` turns
anything audio-like (a path, bytes, a file object, an `(array, sampling_rate)` pair, a `datasets`-style dict)
into a mono float32 numpy array at the requested sample rate. `audio_duration` tells how long audio is,
cheaply where it can, and `describe` names a media object in a few words for messages.

Every failure is a `phimm.errors.MediaError` (`ImageError`, `AudioError`) or, for an object of a type that is
not media at all, an `UnsupportedMediaError`; the message names the input, says what was wrong (with the
sizes and limits involved) and what to do about it.

Choices worth knowing:

* Images larger than `max_pixels` are refused from their header, before any pixel is decoded
  (decompression-bomb guard). PIL's own `DecompressionBombError` is reported as an `ImageError` too.
* Images are decoded in full, so a truncated or corrupt PNG/JPEG is refused rather than padded; phimm never
  changes `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` (left `False`, PIL's default).
* Transparent images (RGBA, LA, palette with transparency) are composited on white. 16-bit grayscale
  (`I;16*`) is scaled to 8 bits (value / 257); 32-bit integer (`I`) images are read as 0..65535 the same way
  (negative values clipped to 0). Float (`F`) images in [0, 1] are scaled by 255, others are read as
  0..255 and clipped. Animated / multi-frame images give their first frame. EPS is not opened (PIL would run
  Ghostscript on it).
* Arrays as images: numpy arrays are HxW, HxWxC (C in 1, 3, 4) and, when the last axis can't hold channels,
  CxHxW; torch tensors are CxHxW first, then HxWxC. uint8 is used as is, uint16 scaled by 1/257, bool maps to
  0/255, floats must lie in [0, 1] (a tolerance of 1e-3 is clipped).
* Arrays as audio: 1-D is mono; for 2-D the channel axis is the smaller one when it is at most 8
  (`[samples, channels]` on a tie). Integer samples are scaled to [-1, 1] by their dtype's range (unsigned
  ones are offset-binary: 128 is silence in uint8). A pair may be given as `(array, rate)` or, as
  `scipy.io.wavfile.read` returns it, `(rate, array)`.
* Resampling uses `torchaudio.transforms.Resample`, cached per rate pair. For pairs whose sinc kernel would be
  huge (rates with a tiny common divisor, like 16001 -> 16000) it falls back to exact FFT resampling, which
  needs no kernel. Output length is ceil(n * sample_rate / sampling_rate), as torchaudio's.
* `min_samples` counts samples of the output (after resampling); audio with no samples at all is always refused.
  The default `min_samples=1` accepts a single sample.
* Strings starting with ``data:`` are read as data URIs (base64 or percent-encoded). URLs are not downloaded.
* Dicts: ``{"bytes"}`` / ``{"path"}`` (as `datasets` gives, bytes first), ``{"url"}`` (chat messages) for both;
  ``{"array", "sampling_rate"}`` and OpenAI-style ``{"data": <base64>, "format": ...}`` for audio.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import io
import math
import numbers
import os
import stat
import threading
import urllib.parse
import warnings
from typing import Any, Callable

import numpy as np
import soundfile as sf
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from phimm.errors import AudioError, ImageError, MediaError, PhimmError, UnsupportedMediaError

__all__ = [
    "SAMPLE_RATE",
    "MAX_IMAGE_PIXELS",
    "MAX_AUDIO_SECONDS",
    "MAX_SAMPLE_RATE",
    "load_image",
    "load_audio",
    "audio_duration",
    "describe",
]

SAMPLE_RATE = 16_000
"""The sample rate `load_audio` returns by default (Hz)."""

MAX_IMAGE_PIXELS = 64_000_000
"""Images with more pixels than this are refused before decoding (decompression-bomb guard)."""

MAX_AUDIO_SECONDS = 30 * 60.0
"""Default limit on the duration `load_audio` accepts; pass `max_seconds=None` to lift it."""

MAX_SAMPLE_RATE = 1_000_000
"""Sampling rates (of inputs and of the requested output) above this are refused as nonsensical."""

_FLOAT_IMAGE_TOLERANCE = 1e-3
_MAX_RESAMPLE_KERNEL = 1 << 20  # elements of torchaudio's sinc kernel above which the FFT path is used
_IMAGE_INPUTS = (
    "a PIL.Image.Image, a file path (str or os.PathLike), bytes / bytearray, a binary file object, "
    "a numpy array (HxW, HxWx3 or HxWx4), a torch tensor (CxHxW or HxWxC), or a dict with \"bytes\", \"path\" or "
    '"url"'
)
_AUDIO_INPUTS = (
    "a file path (str or os.PathLike), bytes / bytearray, a binary file object, an (array, sampling_rate) "
    'tuple, or a dict {"array": ..., "sampling_rate": ...} / {"path": ...} / {"bytes": ...} as `datasets` gives'
)
_IMAGE_FORMATS_HINT = "PNG, JPEG, GIF, BMP, TIFF, WebP or another format Pillow reads"
_AUDIO_FORMATS_HINT = "WAV, FLAC, OGG (Vorbis/Opus), MP3, AIFF or another format libsndfile reads"


# --------------------------------------------------------------------------------------------- describe


def describe(x: Any) -> str:
    """A short human description of a media object, for messages: ``photo.png``, ``<array 3x4 uint8>``,
    ``<tensor 3x224x224 float32>``, ``<2048 bytes>``, ``<array 16000 float32 at 16000 Hz>``.
    Never raises."""
    try:
        return _describe(x)
    except Exception:  # describing must not fail on odd objects
        return f"<{type(x).__name__}>"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape) if len(shape) else "scalar"


def _shorten(s: str, n: int = 160) -> str:
    return s if len(s) <= n else s[: n // 2 - 1] + "…" + s[-(n // 2) :]


def _path_text(x: Any, name: str, kind: str, error: type) -> str:
    """A str / PathLike as text, or `error` naming the input (e.g. bytes a PathLike cannot decode)."""
    try:
        return os.fsdecode(os.fspath(x))
    except Exception as e:
        raise error(f"cannot use {name} as an {kind} path: {e}") from None


def _describe(x: Any) -> str:
    if isinstance(x, (str, os.PathLike)):
        s = os.fsdecode(os.fspath(x))
        if s.startswith("data:"):
            return f"<data URI {s[5:].split(',', 1)[0][:40] or 'text/plain'}, {len(s)} chars>"
        return _shorten(s) if s else "<empty path ''>"
    if isinstance(x, (bytes, bytearray, memoryview)):
        n = x.nbytes if isinstance(x, memoryview) else len(x)
        return f"<{n} bytes>"
    if isinstance(x, Image.Image):
        fn = getattr(x, "filename", None)
        src = f" from {_shorten(os.fsdecode(fn))}" if isinstance(fn, (str, bytes)) and fn else ""
        return f"<PIL image {x.width}x{x.height} {x.mode}{src}>"
    if isinstance(x, np.ndarray):
        return f"<array {_shape(x.shape)} {x.dtype}>"
    if isinstance(x, torch.Tensor):
        return f"<tensor {_shape(tuple(x.shape))} {str(x.dtype).removeprefix('torch.')}>"
    if isinstance(x, (tuple, list)) and len(x) == 2:
        pair = _split_pair(x)
        if pair is not None:
            return f"{_describe(pair[0]).removesuffix('>')} at {pair[1]!r} Hz>"
    if isinstance(x, dict):
        if x.get("path") is not None and isinstance(x["path"], (str, os.PathLike)):
            return _describe(x["path"])  # a name is more telling than "<n bytes>"
        for key in ("bytes", "url", "data"):
            if x.get(key) is not None:
                return _describe(x[key]) if key != "data" else f"<base64 data, {len(str(x[key]))} chars>"
        if "array" in x:
            rate = x.get("sampling_rate", x.get("sample_rate"))
            return f"{_describe(x['array']).removesuffix('>')} at {rate!r} Hz>"
        return f"<dict with keys {sorted(map(str, x))[:8]}>"
    if callable(getattr(x, "read", None)):
        name = getattr(x, "name", None)
        if isinstance(name, (str, bytes)) and name:
            return _shorten(os.fsdecode(name))
        return f"<{type(x).__name__} file object>"
    if isinstance(x, (tuple, list)):
        return f"<{type(x).__name__} of {len(x)} items>"
    if isinstance(x, (numbers.Number, type(None))):
        return f"<{type(x).__name__} {_shorten(repr(x), 40)}>"
    return f"<{type(x).__name__}>"


# --------------------------------------------------------------------------------------------- shared helpers


def _sniff(head: bytes) -> str | None:
    """What the first bytes of a file look like, for messages."""
    if not head:
        return None
    magic = [
        (b"\x89PNG\r\n\x1a\n", "a PNG image"),
        (b"\xff\xd8", "a JPEG image"),
        (b"GIF8", "a GIF image"),
        (b"BM", "a BMP image"),
        (b"II*\x00", "a TIFF image"),
        (b"MM\x00*", "a TIFF image"),
        (b"fLaC", "FLAC audio"),
        (b"OggS", "Ogg audio"),
        (b"ID3", "MP3 audio"),
        (b"FORM", "AIFF audio"),
        (b"%PDF", "a PDF document"),
        (b"PK\x03\x04", "a ZIP archive"),
    ]
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "WAV audio"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    for prefix, what in magic:
        if head.startswith(prefix):
            return what
    stripped = head.lstrip()
    if stripped[:1] == b"<" and (b"html" in stripped[:64].lower() or stripped[:5].lower() == b"<!doc"):
        return "HTML (a web page, not media)"
    text = None
    for cut in range(4):  # a multi-byte character may be cut at the end of the head
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "text"
    return None


def _content_hint(head: bytes) -> str:
    try:
        what = _sniff(head)
    except Exception:  # a hint must never hide the real error
        what = None
    preview = f"it starts with {head[:16]!r}"
    return f" ({preview}; it looks like {what})" if what else f" ({preview})"


def _file_head(path: str, n: int = 64) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except Exception:
        return b""


def _check_file(path: str, name: str, what: str, err: type[MediaError]) -> str:
    """Refuse missing files, directories, special files and empty files with a clear message."""
    if path == "":
        raise err(f"the {what} path is an empty string; pass the path of an {what} file")
    if path.startswith(("http://", "https://", "ftp://")) and not os.path.exists(path):
        raise err(
            f"{name} looks like a URL; phimm does not download media: fetch the file first and pass its path "
            "or its bytes"
        )
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise err(f"{what} file not found: {name}; check the path (relative paths start at {os.getcwd()})") from None
    except (OSError, ValueError) as e:
        raise err(f"cannot access {what} file {name}: {e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise err(f"{name} is a directory, not an {what} file; pass the path of a file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise err(f"{name} is not a regular file (a pipe, socket or device?); pass the path of an {what} file")
    if st.st_size == 0:
        raise err(f"{what} file {name} is empty (0 bytes); re-export or re-download it")
    return path


def _read_stream(x: Any, name: str, what: str, err: type[MediaError]) -> bytes:
    try:
        data = x.read()
    except Exception as e:
        raise err(f"cannot read {what} from {name}: {type(e).__name__}: {e}") from None
    if isinstance(data, str):
        raise err(f"{name} is a text-mode file; open {what} files in binary mode: open(path, 'rb')")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UnsupportedMediaError(
            f"{name}.read() returned {type(data).__name__}, not bytes; pass a binary file object or the bytes"
        )
    data = bytes(data)
    if not data:
        raise err(f"{what} from {name} is empty (0 bytes); if it was read before, seek(0) first")
    return data


def _data_uri_bytes(uri: str, name: str, what: str, err: type[MediaError]) -> bytes:
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise err(f"{name} is a malformed data URI: it has no ','; expected data:<mime>;base64,<data>")
    try:
        if header.endswith(";base64"):
            data = base64.b64decode("".join(payload.split()), validate=True)
        else:
            data = urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as e:
        raise err(f"{name} is a data URI whose base64 payload does not decode: {e}") from None
    if not data:
        raise err(f"{what} in {name} is empty (0 bytes)")
    return data


def _dict_media(x: dict, keys: tuple[str, ...]) -> Any:
    """The first non-None of `keys` in a media dict ({"bytes", "path"} from `datasets`, {"url"} from chat
    messages), or None."""
    for key in keys:
        if x.get(key) is not None and not isinstance(x[key], dict):
            return x[key]
    return None


def _to_numpy(x: Any, name: str, what: str, err: type[MediaError]) -> np.ndarray:
    """A numpy view/copy of a numpy array or torch tensor (any device, any dtype numpy can hold)."""
    if isinstance(x, np.ndarray):
        return np.asarray(x)
    try:
        t = x.detach()
        if t.is_complex():
            raise err(f"{what} {name} is complex; pass real-valued data")
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.float()  # bfloat16, float8 variants: numpy can't hold them
        return t.cpu().resolve_conj().resolve_neg().numpy()
    except PhimmError:
        raise
    except Exception as e:
        raise err(f"cannot read {what} tensor {name} into memory: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------------------------- images


def _check_max_pixels(max_pixels: Any) -> int | None:
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral) or max_pixels < 1:
        raise ImageError(f"max_pixels must be a positive integer or None (no limit), got {max_pixels!r}")
    return int(max_pixels)


def _check_image_size(w: int, h: int, name: str, max_pixels: int | None) -> None:
    if w < 1 or h < 1:
        raise ImageError(f"image {name} is {w}x{h}: it has no pixels; an image must be at least 1x1")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"image {name} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} pixels (max_pixels); "
            "it was refused before decoding (a possible decompression bomb): downscale it, or pass a larger "
            "max_pixels if you trust the file"
        )


_WARNINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_pillow():
    """Silence Pillow's warnings while parsing headers / EXIF: its DecompressionBombWarning (our max_pixels check
    is authoritative) and its UserWarnings about corrupt metadata (which phimm ignores, as viewers do). The lock
    keeps our own concurrent calls from corrupting the global warning filters (catch_warnings is not
    thread-safe); pixel decoding runs outside it."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


def _open_formats() -> list[str]:
    Image.init()
    return [f for f in Image.OPEN if f != "EPS"]  # EPS would run Ghostscript


def load_image(x: Any, *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load `x` as a fully decoded RGB image, oriented as its EXIF tag says (as a viewer shows it).

    `x` may be a `PIL.Image.Image`, a path (`str` / `os.PathLike`; ``data:`` URIs too), `bytes` /
    `bytearray` / `memoryview`, a binary file object, a numpy array (HxW gray, HxWx1, HxWx3, HxWx4), a
    torch tensor (CxHxW or HxWxC), or a dict with "bytes" / "path" (`datasets`) or "url" (chat messages);
    arrays are uint8, uint16, bool or float in [0, 1].
    The result is always a new image (never `x` itself) that holds no open file.

    Raises `ImageError` (missing / empty / truncated / corrupt / non-image file, no pixels, more than
    `max_pixels` pixels, bad array shape or dtype, NaN) or `UnsupportedMediaError` (not image-like).
    """
    max_pixels = _check_max_pixels(max_pixels)
    name = describe(x)
    if isinstance(x, Image.Image):
        return _finish_image(x, name, max_pixels, given=True)
    if isinstance(x, (str, os.PathLike)):
        path = _path_text(x, name, "image", ImageError)
        if path.startswith("data:"):
            data = _data_uri_bytes(path, name, "image", ImageError)
            return _open_image(io.BytesIO(data), name, max_pixels, data[:64])
        _check_file(path, name, "image", ImageError)
        return _open_image(path, name, max_pixels, None)
    if isinstance(x, (bytes, bytearray, memoryview)):
        data = bytes(x)
        if not data:
            raise ImageError("image bytes are empty (0 bytes); pass the bytes of an image file")
        return _open_image(io.BytesIO(data), name, max_pixels, data[:64])
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return _image_from_array(x, name, max_pixels)
    if callable(getattr(x, "read", None)):
        data = _read_stream(x, name, "image", ImageError)
        return _open_image(io.BytesIO(data), name, max_pixels, data[:64])
    if isinstance(x, dict):
        inner = _dict_media(x, ("bytes", "path", "url"))
        if inner is None:
            raise ImageError(
                f'image dict {name} has no usable "bytes", "path" or "url" (as `datasets` or chat messages give); '
                "pass one of those"
            )
        return load_image(inner, max_pixels=max_pixels)
    raise UnsupportedMediaError(f"cannot use {name} (type {type(x).__qualname__}) as an image; pass {_IMAGE_INPUTS}")


def _open_image(src: str | io.BytesIO, name: str, max_pixels: int | None, head: bytes | None) -> Image.Image:
    try:
        with _quiet_pillow():
            im = Image.open(src, formats=_open_formats())
    except Image.DecompressionBombError as e:
        limit = f"the limit of {max_pixels:,} pixels (max_pixels)" if max_pixels is not None else "Pillow's limit"
        raise ImageError(
            f"image {name} has more pixels than {limit} ({e}); it was refused before decoding (a possible "
            "decompression bomb): downscale it (allowing more than Pillow's limit also needs "
            "PIL.Image.MAX_IMAGE_PIXELS raised)"
        ) from None
    except UnidentifiedImageError:
        if head is None:
            head = _file_head(src) if isinstance(src, str) else b""
        what = _sniff(head)
        if what is not None and what.endswith("image"):
            raise ImageError(
                f"{name} looks like {what} but Pillow cannot read it: it is truncated or corrupt; re-export or "
                "re-download it"
            ) from None
        raise ImageError(
            f"{name} is not an image phimm can read{_content_hint(head)}; pass an image in {_IMAGE_FORMATS_HINT} "
            "(a download may have saved an error page instead)"
        ) from None
    except Exception as e:
        raise ImageError(
            f"cannot open image {name}: it is truncated or corrupt ({type(e).__name__}: {e}); re-export or "
            "re-download it"
        ) from None
    try:
        with im:
            return _finish_image(im, name, max_pixels)
    except PhimmError:
        raise
    except Exception as e:  # closing a broken file
        raise ImageError(f"cannot read image {name}: {type(e).__name__}: {e}") from None


def _finish_image(im: Image.Image, name: str, max_pixels: int | None, given: bool = False) -> Image.Image:
    """Size checks before decoding, full decode, EXIF orientation, conversion to RGB. `given`: `im` is the
    caller's PIL image (not one phimm opened)."""
    w, h = im.size
    _check_image_size(w, h, name, max_pixels)
    try:
        im.load()
    except Exception as e:
        if given and "closed" in str(e):
            raise ImageError(
                f"PIL image {name} was closed before its pixels were loaded; call .load() before closing it, or "
                "pass the file path instead"
            ) from None
        raise ImageError(
            f"image {name} is truncated or corrupt and cannot be fully decoded ({type(e).__name__}: {e}); "
            "re-export or re-download it"
        ) from None
    mode = im.mode
    try:
        with _quiet_pillow():
            oriented = ImageOps.exif_transpose(im)
    except Exception:
        oriented = None  # unreadable EXIF: show the image as stored, as viewers do
    try:
        if oriented is None:
            oriented = im.copy()
        rgb = _to_rgb(oriented, name)
    except PhimmError:
        raise
    except Exception as e:
        raise ImageError(
            f"cannot convert image {name} (mode {mode}) to RGB: {type(e).__name__}: {e}; save it as an 8-bit "
            "RGB or RGBA PNG/JPEG"
        ) from None
    _check_image_size(rgb.width, rgb.height, name, max_pixels)
    return rgb


def _u16_to_u8(a: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 by value / 257, rounded (65535 -> 255, 32896 -> 128)."""
    a = np.clip(a.astype(np.int64), 0, 65535)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        return Image.fromarray(_u16_to_u8(np.asarray(im)), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ImageError(f"float image {name} contains NaN or infinite pixels; fix or re-export it")
        if a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "La":  # premultiplied gray + alpha: Pillow converts it only by way of RGBa
        lum, alpha = im.split()
        im = Image.merge("RGBa", (lum, lum, lum, alpha))
    if im.has_transparency_data:
        return _composite_on_white(im.convert("RGBA"))
    if mode == "RGB":
        return im  # already a fresh copy (exif_transpose / copy in _finish_image)
    return im.convert("RGB")


def _image_from_array(x: Any, name: str, max_pixels: int | None) -> Image.Image:
    is_tensor = isinstance(x, torch.Tensor)
    shape = tuple(int(s) for s in x.shape)
    bad_shape = ImageError(
        f"image array {name} has shape {shape}; expected HxW (grayscale), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA)"
        + (", or CxHxW for a tensor" if is_tensor else ", or CxHxW")
    )
    if len(shape) == 2:
        h, w = shape
        layout = "HW"
    elif len(shape) == 3:
        first, last = shape[0] in (1, 3, 4), shape[-1] in (1, 3, 4)
        if is_tensor:
            layout = "CHW" if first else "HWC" if last else None
        else:
            layout = "HWC" if last else "CHW" if first else None
        if layout is None:
            raise bad_shape
        h, w = (shape[1], shape[2]) if layout == "CHW" else (shape[0], shape[1])
    else:
        raise bad_shape
    _check_image_size(w, h, name, max_pixels)  # before copying anything
    a = _to_numpy(x, name, "image", ImageError)
    if layout == "HW":
        a = a[:, :, None]
    elif layout == "CHW":
        a = np.moveaxis(a, 0, -1)
    kind = a.dtype.kind
    if a.dtype == np.uint8:
        a8 = a
    elif a.dtype == np.uint16:
        a8 = _u16_to_u8(a)
    elif kind == "b":
        a8 = a.astype(np.uint8) * np.uint8(255)
    elif kind == "f":
        nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        if nan or inf:
            raise ImageError(
                f"float image {name} contains {nan} NaN and {inf} infinite values; float images must be finite "
                "and in [0, 1] (use numpy.nan_to_num, or fix the computation that produced them)"
            )
        lo, hi = float(a.min()), float(a.max())
        if lo < -_FLOAT_IMAGE_TOLERANCE or hi > 1.0 + _FLOAT_IMAGE_TOLERANCE:
            raise ImageError(
                f"float image {name} has values in [{lo:g}, {hi:g}]; float images must be in [0, 1] "
                "(divide 0..255 data by 255, or pass it as uint8)"
            )
        a8 = np.rint(np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise ImageError(
            f"image array {name} has dtype {a.dtype}; use uint8 (0..255), uint16 (0..65535), bool, or float in "
            "[0, 1] (for example array.astype(numpy.uint8) for 0..255 integers)"
        )
    c = a8.shape[-1]
    a8 = np.ascontiguousarray(a8)
    if c == 1:
        return Image.fromarray(a8[:, :, 0], "L").convert("RGB")
    if c == 3:
        return Image.fromarray(a8, "RGB")
    return _composite_on_white(Image.fromarray(a8, "RGBA"))


# --------------------------------------------------------------------------------------------- audio


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


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (numbers.Number, np.generic)) or (
        isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim == 0
    )


def _split_pair(x: tuple | list) -> tuple[Any, Any] | None:
    """(array, rate) from a 2-item tuple/list in either order, or None when it is not such a pair."""
    a, b = x
    if _is_scalar(b) and not _is_scalar(a):
        return a, b
    if _is_scalar(a) and not _is_scalar(b):
        return b, a  # scipy.io.wavfile.read order
    return None


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
                with np.errstate(over="ignore", invalid="ignore"):  # non-finite blocks are refused below
                    chunks.append(block[:, 0].copy() if channels == 1 else block.mean(axis=1, dtype=np.float32))
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
        with np.errstate(over="ignore"):  # an overflowing mixdown is refused after resampling
            mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)
    try:
        out = _resample(np.ascontiguousarray(mono, dtype=np.float32), rate, sample_rate)
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


def _resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    if orig == new:
        return x.copy()
    g = math.gcd(orig, new)
    if _kernel_elements(orig, new) > _MAX_RESAMPLE_KERNEL:
        return _fft_resample(x, orig, new)
    resampler = _resampler(orig // g, new // g)
    with torch.no_grad():
        y = resampler(torch.from_numpy(x)[None])[0]
    return y.numpy().copy()
