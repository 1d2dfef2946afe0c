"""CPU kernels of phimm's own, built from source on first use.

`int4_gemm.cpp`: group-wise int4 weights times int8-quantized activations on AVX-512 VNNI, and on AMX from 16
rows on where the CPU has it (see its header). It is plain C++ with a C interface, compiled once per machine by
the system's C++ compiler (`CXX`, else `g++`; about a second) into a cache folder (`PHIMM_KERNEL_CACHE`, else
`~/.cache/phimm/kernels`) and called through `ctypes`, which releases the GIL for the call. Where there is no
compiler, the build fails, or the CPU lacks the instructions, `int4_kernel()` returns None and callers use
torch's own kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("int4_gemm.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_lock = threading.Lock()
_loaded: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    root = os.environ.get("PHIMM_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "phimm" / "kernels"


def _build(compiler: str) -> Path:
    """The shared library for this source, compiler and CPU, compiled unless already in the cache."""
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(" ".join([compiler, *_FLAGS]).encode())
    key.update(_cpu_flags().encode())
    target = _cache_dir() / f"int4_gemm-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: another process building the same file sees one or the other
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class Int4Kernel:
    """The loaded int4 library: `gemm(x, packed, scales, group)`."""

    def __init__(self, path: Path):
        # libgomp is resolved by its soname: the one torch loaded is reused, not a second OpenMP runtime
        lib = ctypes.CDLL(str(path))
        lib.phimm_int4_isa.restype = ctypes.c_int
        lib.phimm_int4_gemm.restype = ctypes.c_int
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.phimm_int4_gemm.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, ctypes.c_int]
        self.lib, self.path = lib, path
        isa = lib.phimm_int4_isa()
        self.available = isa >= 1  # AVX-512 VNNI
        self.amx = isa >= 2  # and AMX tiles for many rows (Linux grants them on the first such call)

    def gemm(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
        """`x` [M, K] (made fp32 and contiguous), `packed` and `scales` from `pack_int4`: returns fp32 [M, N]."""
        x = x.to(torch.float32).contiguous()
        m, k = x.shape
        n = scales.shape[0] * 16
        if k != packed.shape[1] // 8:
            raise ValueError(f"int4 kernel: input has {k} channels, the weight {packed.shape[1] // 8}")
        y = torch.empty(m, n, dtype=torch.float32)
        rc = self.lib.phimm_int4_gemm(x.data_ptr(), m, k, packed.data_ptr(), scales.data_ptr(), n, group,
                                      y.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"phimm int4 kernel refused its arguments (code {rc}): x {tuple(x.shape)}, "
                               f"N {n}, group {group}")
        return y


def int4_kernel() -> Int4Kernel | None:
    """phimm's int4 CPU kernel for this machine, built on first call; None where it cannot be had (the reason
    is logged once)."""
    with _lock:
        if "int4" not in _loaded:
            _loaded["int4"] = _load_int4()
        return _loaded["int4"]


def _load_int4() -> Int4Kernel | None:
    if os.environ.get("PHIMM_NO_NATIVE_KERNELS"):
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        log.info("phimm int4 kernel: no C++ compiler found; torch's int4 kernel is used")
        return None
    try:
        kernel = Int4Kernel(_build(compiler))
    except Exception as exc:  # a build or load failure leaves torch's kernel in place
        log.warning("phimm int4 kernel unavailable (%s); torch's int4 kernel is used", exc)
        return None
    if not kernel.available:
        log.info("phimm int4 kernel: this CPU lacks AVX-512 VNNI; torch's int4 kernel is used")
        return None
    return kernel


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`int4_gemm.cpp`'s layout of int4 values `q` (0..15, [N, K], N a multiple of 16, K of `group`) with
    w ~= (q - 8) * scale + zero (`scale`, `zero` [K / group, N]): (packed uint8 [N / 16, K * 8], bf16 scales
    [N / 16, K / group, 32]: per block of 16 rows and group, the 16 scales, then the 16 offsets zero - 8 scale)."""
    n, k = q.shape
    blocks = q.to(torch.uint8).reshape(n // 16, 16, k // 8, 2, 4).permute(0, 2, 1, 4, 3)  # [nb, kb, row, j, half]
    packed = (blocks[..., 0] | (blocks[..., 1] << 4)).reshape(n // 16, k * 8).contiguous()
    sc = torch.stack([scale.float(), zero.float() - 8.0 * scale.float()])  # [2, K / group, N]
    sc = sc.reshape(2, k // group, n // 16, 16).permute(2, 1, 0, 3).reshape(n // 16, k // group, 32)
    return packed, sc.to(torch.bfloat16).contiguous()


def unpack_int4(packed: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """The fp32 weight [N, K] that `pack_int4`'s output stands for (checks and the dequantizing paths)."""
    nb, k8 = packed.shape
    k = k8 // 8
    v = packed.reshape(nb, k // 8, 16, 4)
    q = torch.stack([v & 15, v >> 4], dim=-1)  # [nb, kb, row, j, half]
    q = q.permute(0, 2, 1, 4, 3).reshape(nb * 16, k).float()  # channel 8 kb + 4 half + j
    sc = scales.float().reshape(nb, k // group, 2, 16).permute(0, 3, 1, 2).reshape(nb * 16, k // group, 2)
    return (q.reshape(nb * 16, k // group, group) * sc[..., :1] + sc[..., 1:]).reshape(nb * 16, k)
