"""Where media come from: describing an input in a few words, sniffing what bytes are, reading files, binary
streams and ``data:`` URIs, and the helpers `phimm.media.image` and `phimm.media.audio` share.

Every failure is a `phimm.errors.MediaError` of the kind the caller names (`ImageError` or `AudioError`), or an
`UnsupportedMediaError` for an object that is not media at all.
"""

from __future__ import annotations

import base64
import binascii
import numbers
import os
import stat
import urllib.parse
from typing import Any

import numpy as np
import torch
from PIL import Image

from phimm.errors import MediaError, PhimmError, UnsupportedMediaError

__all__ = ["describe"]


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


# --------------------------------------------------------------------------------------------- input forms


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
