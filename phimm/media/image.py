"""Loading and validating images: `load_image` turns anything image-like into a fully decoded RGB
`PIL.Image.Image`, oriented as a viewer shows it (see `phimm.media` for the choices made).

Failures are `ImageError` or, for an object that is not image-like, `UnsupportedMediaError`.
"""

from __future__ import annotations

import contextlib
import io
import numbers
import os
import threading
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from phimm.errors import ImageError, PhimmError, UnsupportedMediaError

from .sources import (
    _check_file,
    _content_hint,
    _data_uri_bytes,
    _dict_media,
    _file_head,
    _path_text,
    _read_stream,
    _sniff,
    _to_numpy,
    describe,
)

__all__ = ["MAX_IMAGE_PIXELS", "load_image"]

MAX_IMAGE_PIXELS = 64_000_000
"""Images with more pixels than this are refused before decoding (decompression-bomb guard)."""

_FLOAT_IMAGE_TOLERANCE = 1e-3
_IMAGE_INPUTS = (
    "a PIL.Image.Image, a file path (str or os.PathLike), bytes / bytearray, a binary file object, "
    "a numpy array (HxW, HxWx3 or HxWx4), a torch tensor (CxHxW or HxWxC), or a dict with \"bytes\", \"path\" or "
    '"url"'
)
_IMAGE_FORMATS_HINT = "PNG, JPEG, GIF, BMP, TIFF, WebP or another format Pillow reads"


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
