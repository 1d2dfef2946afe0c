"""Tensors of safetensors files as views of memory maps: nothing is read until a tensor is used, and a tensor
already in the wanted dtype is the file's pages (no second copy in memory).

`MappedShards(tensors, per_file=...)` maps either

- each tensor on its own (the default on POSIX, through libc's `mmap` / `munmap` via ctypes), so that a tensor
  the runtime replaces (say, by a re-laid-out copy for oneDNN) gives its pages back when it is dropped; or
- each file once (`per_file=True`, and always where the per-tensor maps are not available: non-POSIX systems, or
  no usable libc), its tensors sharing that map (`torch.UntypedStorage.from_file`); pages come back only when
  every tensor of the file is gone.

`per_file=None` (the default) takes the choice from the environment variable `PHIMM_MMAP_PER_FILE`: set to any
non-empty value, one map per file; unset or empty, one map per tensor where the OS allows.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

PER_FILE_ENV = "PHIMM_MMAP_PER_FILE"

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def per_file_default() -> bool:
    """`per_file` when it is not given: True when `PHIMM_MMAP_PER_FILE` is set to a non-empty value."""
    return bool(os.environ.get(PER_FILE_ENV))


class MappedShards:
    """Tensors of safetensors files as views of private (copy-on-write) memory maps: writing to a tensor never
    changes the file, and nothing is read until a tensor is used.

    `tensors`: key -> an entry with `.file` (Path), `.dtype` (safetensors name), `.shape` and `.start` (absolute
    byte offset in the file) / `.nbytes` (`phimm.formats.check.TensorInfo`, as `check()` / `list_tensors()` give
    them).

    `per_file`: False maps each tensor on its own where the OS allows (POSIX), so that a dropped tensor gives its
    pages back; True maps each file once, shared by its tensors (what non-POSIX systems always get); None (the
    default) is True when the environment variable `PHIMM_MMAP_PER_FILE` is set to a non-empty value, else
    False. `self.per_file` says which one is in use."""

    def __init__(self, tensors: Mapping[str, Any], per_file: bool | None = None):
        self.tensors = dict(tensors)
        self._bytes: dict[Path, torch.Tensor] = {}
        if per_file is None:
            per_file = per_file_default()
        self._libc = None if per_file else _libc_mmap()

    @property
    def per_file(self) -> bool:
        """Whether the tensors share one map per file (True) or each has its own (False)."""
        return self._libc is None

    def _file_bytes(self, file: Path) -> torch.Tensor:
        t = self._bytes.get(file)
        if t is None:
            size = os.path.getsize(file)
            storage = torch.UntypedStorage.from_file(str(file), shared=False, nbytes=size)
            t = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,), (1,))
            self._bytes[file] = t
        return t

    def _map(self, file: Path, start: int, nbytes: int) -> torch.Tensor:
        """`nbytes` bytes of `file` from `start`, as a uint8 tensor over a map of their own (unmapped when the
        last tensor viewing it is freed)."""
        import ctypes
        import mmap
        import weakref

        libc = self._libc
        page = mmap.ALLOCATIONGRANULARITY
        off = start - start % page
        length = start + nbytes - off
        fd = os.open(file, os.O_RDONLY)
        try:
            addr = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, off)
        finally:
            os.close(fd)  # the map stays valid without the descriptor
        if addr in (None, ctypes.c_void_p(-1).value):
            raise CheckpointError(f"{file}: cannot map bytes {start}..{start + nbytes}: "
                                  f"{os.strerror(ctypes.get_errno())}")
        buf = (ctypes.c_uint8 * length).from_address(addr)
        weakref.finalize(buf, libc.munmap, addr, length)  # torch.frombuffer keeps `buf` alive while in use
        return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start - off)

    def get(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        dtype = ST_DTYPES.get(info.dtype)
        if dtype is None:
            raise CheckpointError(f"{info.file.name}: tensor {key} has dtype {info.dtype}, which phimm cannot read")
        if info.nbytes == 0:
            return torch.empty(tuple(info.shape), dtype=dtype)
        if self._libc is not None:
            raw = self._map(info.file, info.start, info.nbytes)
        else:
            raw = self._file_bytes(info.file)[info.start : info.start + info.nbytes]
        if info.start % dtype.itemsize:
            raw = raw.clone()  # not aligned for a view: copy this one tensor
        return raw.view(dtype).view(tuple(info.shape))

    def close(self) -> None:
        """Drop this object's whole-file maps (tensors still viewing a map keep it)."""
        self._bytes.clear()


@functools.lru_cache(maxsize=None)
def _libc_mmap():
    """libc's mmap / munmap / madvise through ctypes (POSIX), or None where they are not available."""
    import ctypes
    import ctypes.util

    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.restype = ctypes.c_int
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


__all__ = ["PER_FILE_ENV", "ST_DTYPES", "MappedShards", "per_file_default"]


def release_file_pages(t: torch.Tensor) -> int:
    """Drop from this process's memory the pages of a file-backed memory map that lie wholly inside `t`'s bytes
    (`madvise(MADV_DONTNEED)`; a later read of them reads the file again), for a tensor that is no longer used,
    such as a weight whose packed copy has replaced it. Anonymous memory (a tensor not read from a mapped file) is
    left alone, as are pages that reach outside `t`. Returns the bytes released (0 where unsupported)."""
    libc = _libc_mmap()
    span = _whole_pages(t)
    if libc is None or span is None or not _file_backed(*span):
        return 0
    lo, hi = span
    MADV_DONTNEED = 4
    return hi - lo if libc.madvise(lo, hi - lo, MADV_DONTNEED) == 0 else 0


def file_mappings() -> list[tuple[int, int]]:
    """[lo, hi) of this process's private mappings of regular files, sorted (from /proc/self/maps; empty where it
    cannot be read)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/") and parts[1].endswith("p"):
                    a, b = (int(x, 16) for x in parts[0].split("-"))
                    out.append((a, b))
    except OSError:
        pass
    return sorted(out)


def resident_pages(lo: int, hi: int) -> set[int] | None:
    """The addresses of the pages of [lo, hi) that this process has in memory now: present in its page tables
    (`/proc/self/pagemap`, bit 63), so a page of a mapped file counts only once this process has read it, not
    because the file is in the page cache. None where pagemap cannot be read."""
    import mmap
    import struct

    page = mmap.PAGESIZE
    lo, hi = lo // page * page, (hi + page - 1) // page * page
    n = (hi - lo) // page
    if n <= 0:
        return set()
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(lo // page * 8)
            raw = f.read(n * 8)
    except OSError:
        return None
    if len(raw) != n * 8:
        return None
    return {lo + k * page for k, (entry,) in enumerate(struct.iter_unpack("<Q", raw)) if entry >> 63}


def file_backed(t: torch.Tensor) -> bool:
    """Whether all of `t`'s whole pages lie in one private mapping of a regular file: a weight read lazily from
    a memory-mapped checkpoint, whose pages `release_file_pages` can give back."""
    span = _whole_pages(t)
    return span is not None and _file_backed(*span)


def _whole_pages(t: torch.Tensor) -> tuple[int, int] | None:
    """[lo, hi): the addresses of the pages lying wholly inside a CPU tensor's bytes; None where there are none."""
    if t.device.type != "cpu" or t.numel() == 0:
        return None
    import mmap

    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = (start + page - 1) // page * page, end // page * page
    return (lo, hi) if hi > lo else None


def _file_backed(lo: int, hi: int) -> bool:
    """Whether [lo, hi) lies inside one private mapping of a regular file (`file_mappings`)."""
    return any(a <= lo and hi <= b for a, b in file_mappings())
