"""CPU kernels of phimm's own, built from source on first use.

- `int4_gemm.cpp` (`int4_kernel()`): group-wise int4 weights times int8-quantized activations on AVX-512 VNNI,
  and on AMX from 16 rows on where the CPU has it (see its header).
- `decode_attention.cpp` (`attention_kernel()`): one query position per row against a long KV cache,
  grouped-query attention, keys and values read once in place (see its header).
- `rms_norm.cpp` (`norm_kernel()`): the decoder's RMSNorm in one pass over each row (see its header).
- `gemv_bf16.cpp` (`gemv_kernel()`): bf16 weight times a few bf16 input rows, for the LoRA factors of decode
  steps (see its header).

Each is plain C++ with a C interface, compiled once per machine by the system's C++ compiler (`CXX`, else `g++`;
about a second) into a cache folder (`PHIMM_KERNEL_CACHE`, else `~/.cache/phimm/kernels`) and called through
`ctypes`, which releases the GIL for the call. Where there is no compiler, the build fails, the CPU lacks the
instructions, or `PHIMM_NO_NATIVE_KERNELS` is set, the functions return None and callers use torch's kernels.
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

_HERE = Path(__file__).parent
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


def _build(compiler: str, name: str = "int4_gemm") -> Path:
    """The shared library of `name`.cpp for this source, compiler and CPU, compiled unless already in the
    cache."""
    source = _HERE / f"{name}.cpp"
    key = hashlib.sha256()
    key.update(source.read_bytes())
    for header in sorted(_HERE.glob("*.h")):  # the helpers the sources include
        key.update(header.read_bytes())
    key.update(" ".join([compiler, *_FLAGS]).encode())
    key.update(_cpu_flags().encode())
    target = _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *_FLAGS, str(source), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: another process building the same file sees one or the other
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_I64, _PTR, _INT, _FLOAT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float


def _open(path: Path, isa: str, fn: str, argtypes: list) -> tuple[ctypes.CDLL, int]:
    """The library at `path`, its function `fn` (returning an int code) given `argtypes`, and what its function
    `isa` says this build can do."""
    # libgomp is resolved by its soname: the one torch loaded is reused, not a second OpenMP runtime
    lib = ctypes.CDLL(str(path))
    getattr(lib, isa).restype = ctypes.c_int
    getattr(lib, fn).restype = ctypes.c_int
    getattr(lib, fn).argtypes = argtypes
    return lib, getattr(lib, isa)()


class Int4Kernel:
    """The loaded int4 library: `gemm(x, packed, scales, group)`."""

    def __init__(self, path: Path):
        lib, isa = _open(path, "phimm_int4_isa", "phimm_int4_gemm",
                         [_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _INT])
        self.lib, self.path = lib, path
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
    return _once("int4", _load_int4)


def _once(key: str, make):
    """`make()`'s kernel (or None), made on the first call for `key` and kept (later calls, on the decode path,
    take no lock)."""
    try:
        return _loaded[key]
    except KeyError:
        pass
    with _lock:
        if key not in _loaded:
            _loaded[key] = make()
        return _loaded[key]


def _load_int4() -> Int4Kernel | None:
    return _load("int4_gemm", Int4Kernel, "phimm int4 kernel", "torch's int4 kernel", "AVX-512 VNNI")


def _load(name: str, cls, what: str, instead: str, needs: str):
    """`cls` over the library of `name`.cpp, or None (the reason logged) where it cannot be had."""
    if os.environ.get("PHIMM_NO_NATIVE_KERNELS"):
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        log.info("%s: no C++ compiler found; %s is used", what, instead)
        return None
    try:
        kernel = cls(_build(compiler, name))
    except Exception as exc:  # a build or load failure leaves torch's kernel in place
        log.warning("%s unavailable (%s); %s is used", what, exc, instead)
        return None
    if not kernel.available:
        log.info("%s: this CPU lacks %s; %s is used", what, needs, instead)
        return None
    return kernel


class AttentionKernel:
    """The loaded decode-attention library: `decode(query, key, value, starts, scale)`."""

    def __init__(self, path: Path):
        lib, isa = _open(path, "phimm_attn_isa", "phimm_decode_attention",
                         [_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _I64,
                          _I64, _I64, _I64, _I64, _I64, _I64, _PTR, _FLOAT, _PTR, _INT, _INT])
        self.lib, self.path = lib, path
        self.available = isa >= 1  # AVX-512 F and BW

    @staticmethod
    def takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
        """Whether `decode` computes these tensors: CPU, one dtype (fp32 or bf16), one query position, head dims
        multiples of 16, unit stride along them."""
        dtype = query.dtype
        return (dtype in (torch.float32, torch.bfloat16) and key.dtype == dtype and value.dtype == dtype
                and query.device.type == key.device.type == value.device.type == "cpu"
                and query.dim() == 4 and query.shape[2] == 1 and key.dim() == 4 and value.dim() == 4
                and query.shape[-1] % 16 == 0 and value.shape[-1] % 16 == 0
                and key.shape[-1] == query.shape[-1] and key.shape[:3] == value.shape[:3]
                and query.shape[0] == key.shape[0] and query.shape[1] % key.shape[1] == 0
                and query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1)

    def decode(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, starts: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        """`query [B, H, 1, D]` against `key` / `value` `[B, Hkv, T, D]` (views of a cache are read in place), row
        b over columns `starts[b]` .. T-1 (int64 [B]; None: all). Returns `[B, 1, H, Dv]` in the query's dtype."""
        if not self.takes(query, key, value):
            raise ValueError(f"phimm decode attention does not take query {tuple(query.shape)} {query.dtype}, "
                             f"key {tuple(key.shape)} {key.dtype}, value {tuple(value.shape)} {value.dtype}")
        B, H, _, D = query.shape
        hkv, T, dv = key.shape[1], key.shape[2], value.shape[-1]
        out = torch.empty(B, 1, H, dv, dtype=query.dtype)
        if starts is not None:
            starts = starts.to(torch.int64).contiguous()
        qs, ks, vs = query.stride(), key.stride(), value.stride()
        rc = self.lib.phimm_decode_attention(
            query.data_ptr(), B, H, D, qs[0], qs[1], key.data_ptr(), value.data_ptr(), hkv, T, dv,
            ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], None if starts is None else starts.data_ptr(), scale,
            out.data_ptr(), 1 if query.dtype == torch.bfloat16 else 0, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"phimm decode attention refused its arguments (code {rc})")
        return out


def attention_kernel() -> AttentionKernel | None:
    """phimm's decode-attention CPU kernel for this machine, built on first call; None where it cannot be had
    (the reason is logged once)."""
    return _once("attention", lambda: _load("decode_attention", AttentionKernel, "phimm decode attention kernel",
                                            "PyTorch's attention", "AVX-512"))


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


class NormKernel:
    """The loaded RMSNorm library: `rms_norm(x, weight, eps)`."""

    def __init__(self, path: Path):
        lib, isa = _open(path, "phimm_norm_isa", "phimm_rms_norm",
                         [_PTR, _I64, _I64, _I64, _PTR, _FLOAT, _PTR, _INT, _INT])
        self.lib, self.path = lib, path
        self.available = isa >= 1  # AVX-512 F and BW

    @staticmethod
    def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """CPU, x and weight of one dtype (fp32 or bf16), the weight contiguous and as wide as x's last axis,
        unit stride along it, and rows that flatten to one stride; no gradient to keep."""
        return (x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype
                and x.device.type == "cpu" and weight.device.type == "cpu" and x.dim() >= 1
                and weight.dim() == 1 and weight.shape[0] == x.shape[-1] and weight.is_contiguous()
                and x.stride(-1) == 1 and x.numel() > 0
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
                and _rows_stride(x) is not None)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """`weight * (x * rsqrt(mean(x^2, -1) + eps))`, the normalized rows rounded to x's dtype before the
        weight, as transformers' Llama-family RMSNorm; a new contiguous tensor of x's shape."""
        if not self.takes(x, weight):
            raise ValueError(f"phimm RMSNorm does not take x {tuple(x.shape)} {x.dtype} with weight "
                             f"{tuple(weight.shape)} {weight.dtype}")
        n = x.shape[-1]
        rows = x.numel() // n
        out = torch.empty(x.shape, dtype=x.dtype)
        rc = self.lib.phimm_rms_norm(x.data_ptr(), rows, n, _rows_stride(x), weight.data_ptr(), float(eps),
                                     out.data_ptr(), 1 if x.dtype == torch.bfloat16 else 0, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"phimm RMSNorm refused its arguments (code {rc})")
        return out


def _rows_stride(x: torch.Tensor) -> int | None:
    """The stride between consecutive rows of x's last axis when all leading axes flatten to one, else None."""
    leading = [(size, st) for size, st in zip(x.shape[:-1], x.stride()[:-1]) if size != 1]
    if not leading:
        return x.shape[-1]
    stride = expect = leading[-1][1]
    if stride < x.shape[-1]:
        return None
    for size, st in reversed(leading):
        if st != expect:
            return None
        expect *= size
    return stride


def norm_kernel() -> NormKernel | None:
    """phimm's RMSNorm CPU kernel for this machine, built on first call; None where it cannot be had (the reason
    is logged once)."""
    return _once("norm", lambda: _load("rms_norm", NormKernel, "phimm RMSNorm kernel", "the module's own forward",
                                       "AVX-512"))


class GemvKernel:
    """The loaded bf16 matrix-vector library: `gemv(x, w, out=None, alpha=1.0)`, for up to `MAX_ROWS` input rows
    (beyond, oneDNN's GEMMs win)."""

    MAX_ROWS = 32

    def __init__(self, path: Path):
        lib, isa = _open(path, "phimm_gemv_isa", "phimm_gemv_bf16",
                         [_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _FLOAT, _INT, _INT])
        lib.phimm_lora_bf16.restype = _INT
        lib.phimm_lora_bf16.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _FLOAT, _INT]
        self.lib, self.path = lib, path
        self.available = isa >= 1  # AVX-512 BF16

    def takes(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        """bf16 CPU tensors, x's rows (all leading axes, at most `MAX_ROWS`) flattening to one stride, w `[N, K]`
        contiguous with K = x's last axis."""
        return (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu"
                and w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous() and x.dim() >= 1
                and x.shape[-1] == w.shape[1] and x.stride(-1) == 1 and 0 < x.numel() // max(1, x.shape[-1])
                <= self.MAX_ROWS and _rows_stride(x) is not None)

    def gemv(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
             alpha: float = 1.0) -> torch.Tensor:
        """`alpha * x w^T` (`x [..., K]`, `w [N, K]`), rounded to bf16 once; with `out` (contiguous, x's leading
        shape by N), added into it in place (`out + alpha * x w^T`, one rounding) and returned."""
        if not self.takes(x, w):
            raise ValueError(f"phimm gemv does not take x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}")
        n, k = w.shape
        m = x.numel() // k
        accumulate = out is not None
        if out is None:
            out = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
        elif not (out.dtype == torch.bfloat16 and out.is_contiguous() and out.numel() == m * n):
            raise ValueError(f"phimm gemv: out {tuple(out.shape)} {out.dtype} is not a contiguous bf16 [{m}, {n}]")
        rc = self.lib.phimm_gemv_bf16(x.data_ptr(), m, k, _rows_stride(x), w.data_ptr(), n, out.data_ptr(), n,
                                      float(alpha), int(accumulate), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"phimm gemv refused its arguments (code {rc})")
        return out


    def lora_into(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, alpha: float) -> bool:
        """`out += alpha * (x a^T) b^T` in place (`a [r, K]`, `b [N, r]` contiguous bf16; x a^T rounded to bf16, the
        sum rounded once), in one call, where the kernel takes `x` and `a` and `out` is a contiguous bf16 tensor of
        x's rows by N; False (nothing done) otherwise."""
        n, r = b.shape
        if not (self.takes(x, a) and b.dtype == torch.bfloat16 and b.is_contiguous() and r == a.shape[0]
                and out.dtype == torch.bfloat16 and out.is_contiguous() and out.shape[-1] == n
                and out.numel() == x.numel() // x.shape[-1] * n):
            return False
        k = a.shape[1]
        rc = self.lib.phimm_lora_bf16(x.data_ptr(), x.numel() // k, k, _rows_stride(x), a.data_ptr(), r,
                                      b.data_ptr(), n, out.data_ptr(), n, float(alpha), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"phimm LoRA kernel refused its arguments (code {rc})")
        return True


def gemv_kernel() -> GemvKernel | None:
    """phimm's bf16 matrix-vector CPU kernel for this machine, built on first call; None where it cannot be had
    (the reason is logged once)."""
    return _once("gemv", lambda: _load("gemv_bf16", GemvKernel, "phimm bf16 gemv kernel", "oneDNN", "AVX-512 BF16"))
