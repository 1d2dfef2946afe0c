"""Weight formats of the frozen base's linear layers, and the passes that put a model in one.

A format is an object standing in for a layer's weight and bias: `fmt(x) -> x W^T + b`, with `nbytes`. A
`LoraLinear` calls whichever format it holds (`set_base_format`); a plain `nn.Linear` (the output head) becomes a
`FormatLinear`. The model records its format in one field, `weight_format` ("dense", "packed", "int8" or
"int4").

- `PackedWeight`: bf16 re-laid out for oneDNN's matmul on CPU (read 1.3-1.5x faster at decode batch sizes),
  packed on its first call so that loading reads no weights.
- `Int8Weight`: int8 with LoRA adapters in full precision, below.
- `Int4Weight`: group-wise int4 weights (groups of `INT4_GROUP_SIZE` input channels), adapters in full
  precision; see its docstring for its kernels.

Weights are stored as int8 with one scale per output channel (symmetric, absmax / 127), 0.25x fp32 or 0.5x
bf16 bytes. On CPU the matmul runs in fbgemm's int8 kernels: each input row is quantized on the fly (one scale
per row, the `linear_dynamic` path) so the product is an int8 x int8 dot with an fp32 result; the weight-only
`_weight_int8pack_mm` kernel is the fallback where fbgemm is missing. Only the decoder's projections and the
output head are quantized: the encoders, projectors, norms and embeddings keep their dtype (the same for int4).
"""

from __future__ import annotations

import torch
from torch import nn

from adapters import LoraLinear


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (int8 weight [out, in], fp32 scales [out])."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def _fbgemm_ok() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


# the CPU int8 kernel: "fbgemm" (`quantized.linear_dynamic`), "onednn" (`torch.ops.onednn.qlinear_pointwise`, the
# activation quantized here, per tensor, to u8 with a zero point; where torch has it) or "auto": oneDNN's for
# weights of at least `INT8_ONEDNN_MIN_ELEMENTS`, fbgemm's for the rest. Batch 1, one core, each shape's weights
# read in turn from memory (time per call, fbgemm / oneDNN): 16384 x 3072 3.93 / 3.51 ms; 5120 x 3072 1.23 / 1.22;
# 3072 x 8192 1.68 / 1.77; 7168 x 1024 0.67 / 0.72; 32000 x 1024 1.39 / 1.56; 1024 x 1024 0.07 / 0.12. Two layers
# of the published widths and the 200,064 x 3072 head in turn: 13.4 / 15.0 GB/s of int8 weights
INT8_KERNEL = "auto"
INT8_ONEDNN_MIN_ELEMENTS = 48 << 20


def _onednn_int8_ok() -> bool:
    ops = getattr(torch.ops, "onednn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None and hasattr(ops, "qlinear_prepack")
            and hasattr(ops, "qlinear_pointwise"))


class Int8Weight:
    """A frozen weight in int8 (symmetric, per output channel) and the kernel that multiplies by it: oneDNN's or
    fbgemm's on CPU (`INT8_KERNEL`, or `kernel`; each call quantizes its activation per tensor), else torch's
    weight-only `_weight_int8pack_mm`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str | None = None):
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_weight(weight)
        self.bias = None if bias is None else bias.detach().float()
        cpu = weight.device.type == "cpu"
        kernel = kernel or INT8_KERNEL
        if kernel == "auto":
            kernel = "onednn" if weight.numel() >= INT8_ONEDNN_MIN_ELEMENTS else "fbgemm"
        self.use_onednn = cpu and kernel == "onednn" and _onednn_int8_ok()
        self.use_fbgemm = cpu and not self.use_onednn and _fbgemm_ok()
        if self.use_onednn:
            self.packed = torch.ops.onednn.qlinear_prepack(q, [1, self.in_features])
            self.scale = scale.float()
            self.zero_points = torch.zeros(self.out_features, dtype=torch.long)
        elif self.use_fbgemm:
            torch.backends.quantized.engine = "fbgemm"
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, self.bias)
        else:
            self.q, self.scale = q, scale
        self.nbytes = q.numel() + scale.numel() * 4  # int8 values + fp32 scales

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.use_onednn:
            xf = x2.to(torch.float32, copy=True)  # quantized in place below: never the caller's tensor
            lo, hi = torch.aminmax(xf)
            lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)  # the range holds 0: zero is exact
            x_scale = (hi - lo) / 255.0 or 1.0
            x_zp = min(255, max(0, round(-lo / x_scale)))
            qx = xf.div_(x_scale).round_().add_(x_zp).clamp_(0, 255).to(torch.uint8)
            out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.float32
            y = torch.ops.onednn.qlinear_pointwise(qx, x_scale, x_zp, self.packed, self.scale, self.zero_points,
                                                   self.bias, 1.0, 0, out_dtype, "none", [], "")
        elif self.use_fbgemm:
            y = torch.ops.quantized.linear_dynamic(x2.float(), self.packed, False)  # VNNI: full 8-bit range
        else:
            act = x2 if x2.dtype in (torch.bfloat16, torch.float16) else x2.to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(act, self.q, self.scale.to(act.dtype)).float()
            if self.bias is not None:
                y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


INT4_GROUP_SIZE = 128  # input channels sharing one int4 scale and zero (torchao's and GPTQ's usual choice)
_INT4_KERNEL_GROUPS = (128, 64, 32)  # the group sizes aten's CPU int4 kernel takes (and 256)
_INT4_CHUNK_ROWS = 4096  # output rows quantized at a time (a multiple of the kernel's 64-row blocks)


def int4_group_size(in_features: int) -> int:
    """The group size a layer gets: `INT4_GROUP_SIZE`, or the largest of 64 / 32 dividing `in_features` when 128
    does not (smaller layers); 32 (with zero-padded input channels) when none does."""
    for g in _INT4_KERNEL_GROUPS:
        if g <= INT4_GROUP_SIZE and in_features % g == 0:
            return g
    return _INT4_KERNEL_GROUPS[-1]


def quantize_weight_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 of `w` [N, K] (K a multiple of `group`), min/max per group, round to nearest.
    Returns (int32 values 0..15 [N, K], fp32 scales and zeros [K / group, N, 2]) in the convention of aten's int4
    kernels: w ~= (q - 8) * scale + zero."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.clamp(torch.round((g - lo) / scale), 0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8.0 * scale
    return q, torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()


# the CPU int4 kernel: "phimm" (`phimm.kernels`: int4 x int8 on AVX-512 VNNI, AMX from 16 rows, each call
# quantizing its input per group to int8; built from source on first use), "aten" (torch's
# `_weight_int4pack_mm_for_cpu`, weight-only, bf16 activations) or "auto": phimm's where it builds and the CPU has
# the instructions, else aten's. One core, weights read from memory (aten / phimm): batch 1 through 8192 x 3072
# 1.81 / 0.92 ms; the 200,064 x 3072 head 42.0 / 20.3 ms; 1,024 rows through 8192 x 3072 556 / 66 ms
# (benchmarks/int4_kernel.py)
INT4_KERNEL = "auto"
INT4_KERNELS = ("auto", "phimm", "aten")


def _aten_int4_ok(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def _int4_kernel_for(device: torch.device, kernel: str) -> str | None:
    """The kernel a weight on `device` gets for the choice `kernel` (`INT4_KERNELS`): "phimm", "aten" or None."""
    if kernel not in INT4_KERNELS:
        raise ValueError(f"int4 kernel must be one of {list(INT4_KERNELS)}, got {kernel!r}")
    if device.type != "cpu":
        return None
    if kernel in ("auto", "phimm"):
        from .kernels import int4_kernel

        if int4_kernel() is not None:
            return "phimm"
        if kernel == "phimm":
            raise RuntimeError("phimm's int4 kernel is not available here (no C++ compiler, a failed build, or a "
                               "CPU without AVX-512 VNNI: see the log); use kernel='aten' or 'auto'")
    return "aten" if _aten_int4_ok(device) else None


class Int4Weight:
    """A frozen weight in group-wise int4 and the kernel that multiplies by it.

    Values: 4 bits, asymmetric (min/max) per group of `int4_group_size(in_features)` input channels
    (`INT4_GROUP_SIZE` = 128 wherever it divides), one bf16 scale and one bf16 zero (or offset) per group and
    output channel: 128 weights take 64 + 4 bytes, 0.27x bf16. `nbytes` counts the packed values and the scales.

    Kernels on CPU (`INT4_KERNEL`, or `kernel`; `self.kernel` says which one a weight got):
    - "phimm": `phimm.kernels`' kernel (AVX-512 VNNI; AMX tiles from 16 rows on). Each call quantizes its input
      per row and group to int8 (absmax / 127) and sums exact int8 x int4 products per group (as fbgemm's int8
      path quantizes its input); the zero points see the unquantized input. At decode batch sizes it reads its
      weights at close to the memory's speed, twice the rate of torch's kernel.
    - "aten": torch's `torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16 [M, K], packed, group,
      scales_and_zeros_bf16 [K / group, N, 2])` on a weight packed once by
      `torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_int32 [N, K], 2)` (uint8 [N, K / 2]; the CPU packing
      ignores inner_k_tiles), weight-only in bfloat16. It is bound by its own unpacking, not by memory: about as
      fast as int8's fbgemm kernel on one thread.
    Both need output channels zero-padded to a multiple of 16, and input channels to a multiple of the group when
    needed. Elsewhere (another device, a torch without the kernels; `use_kernel=False` forces it) the fallback
    keeps the values two to a byte and dequantizes the whole weight on every call before a plain matmul: correct,
    and slower than the un-quantized weight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, use_kernel: bool | None = None,
                 kernel: str | None = None):
        self.out_features, self.in_features = weight.shape
        self.group = int4_group_size(self.in_features)
        self.bias = None if bias is None else bias.detach()
        self.kernel = None if use_kernel is False else _int4_kernel_for(weight.device, kernel or INT4_KERNEL)
        if use_kernel and self.kernel is None:
            raise RuntimeError(f"no int4 kernel for a weight on {weight.device}")
        n, k = self.out_features, self.in_features
        self.pad_k = -k % self.group
        self.pad_n = -n % 16 if self.kernel else 0
        w = weight.detach()
        if self.pad_k or self.pad_n:
            w = nn.functional.pad(w, (0, self.pad_k, 0, self.pad_n))
        packed, scales = [], []
        for start in range(0, w.shape[0], _INT4_CHUNK_ROWS):  # bounded fp32 / int32 temporaries (the output head)
            q, sz = quantize_weight_int4(w[start:start + _INT4_CHUNK_ROWS], self.group)
            if self.kernel == "phimm":
                from .kernels import pack_int4

                p, sz = pack_int4(q, sz[..., 0], sz[..., 1], self.group)
                packed.append(p)
            elif self.kernel == "aten":
                packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2))
            else:
                packed.append((q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8))
            scales.append(sz)
        # row chunks of 4096 (a multiple of 64) concatenate to the whole packing
        self.packed = torch.cat(packed)
        self._gemm = None
        if self.kernel == "phimm":
            from .kernels import int4_kernel

            self._gemm = int4_kernel().gemm
            self.scales_and_zeros = torch.cat(scales)  # bf16 [N / 16, K / group, 32], see `pack_int4`
        else:
            self.scales_and_zeros = torch.cat(scales, dim=1).to(torch.bfloat16)  # [K / group, N, 2]
        self.nbytes = (self.packed.numel() * self.packed.element_size()
                       + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size())

    @property
    def use_kernel(self) -> bool:
        return self.kernel is not None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] these int4 values stand for (fallback path and checks)."""
        if self.kernel == "phimm":
            from .kernels import unpack_int4

            w = unpack_int4(self.packed, self.scales_and_zeros, self.group)
        elif self.kernel == "aten":
            eye = torch.eye(self.in_features + self.pad_k, dtype=torch.bfloat16, device=self.packed.device)
            w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_and_zeros).t()
        else:
            p = self.packed
            q = torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1).float()
            sz = self.scales_and_zeros.float().transpose(0, 1)  # [N, K / group, 2]
            q = q.reshape(q.shape[0], -1, self.group)
            w = ((q - 8.0) * sz[..., :1] + sz[..., 1:]).reshape(q.shape[0], -1)
        return w[:self.out_features, :self.in_features].to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kernel:
            if self.pad_k:
                x2 = nn.functional.pad(x2, (0, self.pad_k))
            if self._gemm is not None:
                y = self._gemm(x2, self.packed, self.scales_and_zeros, self.group)
            else:
                act = x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16)
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(act.contiguous(), self.packed, self.group,
                                                               self.scales_and_zeros)
            if self.pad_n:
                y = y[:, :self.out_features]
            y = y.to(x.dtype)
        else:
            y = x2 @ self.dequantize(x2.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class PackedWeight:
    """A frozen bf16 CPU weight in oneDNN's blocked layout. `lazy`: keep the source (a memory-mapped tensor is not
    read) and pack on the first call, after which the source is dropped."""

    # `activation`: applied to the GEMM's output inside it (oneDNN post-op), as the module it replaces would
    ACTIVATIONS = {None: ("none", ""), "gelu_tanh": ("gelu", "tanh"), "gelu": ("gelu", "none")}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, lazy: bool = True,
                 activation: str | None = None):
        self.out_features, self.in_features = weight.shape
        self.source: torch.Tensor | None = weight.detach()
        self.bias = bias
        self.packed: torch.Tensor | None = None
        self.nbytes = weight.numel() * weight.element_size()
        self.activation = activation
        self._post_op = self.ACTIVATIONS[activation]
        if not lazy:
            self.pack()

    @staticmethod
    def applies(weight: torch.Tensor | None) -> bool:
        return (weight is not None and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
                and torch.backends.mkldnn.is_available())

    @property
    def pending(self) -> bool:
        return self.packed is None

    def pack(self) -> None:
        from .formats.shards import release_file_pages

        # laid out for batch 1. A layout for batch 16 made 1,079-row prefill GEMMs 10-25 % faster alone (the 16
        # mixed requests at 209m about 6 %), but batch-1 decode of the 209m model 14 % slower (28.6 -> 24.7 tok/s,
        # the vision route 22.6 -> 19.9; full width 68 % of the bandwidth instead of 74-85 %)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.source, 1)
        self.nbytes = self.packed.numel() * self.packed.element_size()
        # a source read from a memory-mapped checkpoint stays mapped (the file's other tensors are in use): give
        # its pages back, or the packed copy would sit beside them
        release_file_pages(self.source)
        self.source = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            self.pack()
        attr, algorithm = self._post_op
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, attr, [], algorithm)

    def dense(self) -> torch.Tensor:
        """The weight `[out, in]` as a plain tensor: the source before packing, else a fresh copy out of the packed
        layout (exact; a transient, e.g. for an in-place `addmm_` into a long input's output)."""
        if self.packed is None:
            return self.source
        return self.packed.to_dense()


class FormatLinear(nn.Module):
    """A frozen `nn.Linear` whose weight is held in a format (the output head; decoder projections are
    `LoraLinear`s holding theirs)."""

    def __init__(self, base: nn.Linear, fmt):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_format = fmt

    @property
    def base_nbytes(self) -> int:
        return int(self.base_format.nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_format(x)


class Int8Linear(FormatLinear):
    """An `nn.Linear` in int8 (kept by name: `FormatLinear(base, Int8Weight(...))`)."""

    def __init__(self, base: nn.Linear):
        super().__init__(base, Int8Weight(base.weight, base.bias))


class Int4Linear(FormatLinear):
    """An `nn.Linear` in group-wise int4: `FormatLinear(base, Int4Weight(...))`."""

    def __init__(self, base: nn.Linear):
        super().__init__(base, Int4Weight(base.weight, base.bias))


class PackedLinear(FormatLinear):
    """A bf16 `nn.Linear` packed for oneDNN (kept by name: `FormatLinear(base, PackedWeight(...))`), followed by
    `activation` where given (`PackedWeight.ACTIVATIONS`). The tied output head's packed copy leaves the
    embedding its own weight for look-ups."""

    def __init__(self, base: nn.Linear, lazy: bool = False, activation: str | None = None):
        super().__init__(base, PackedWeight(base.weight, base.bias, lazy=lazy, activation=activation))


QUANTIZATIONS = ("int8", "int4")


def quantize(model, kind: str) -> dict[str, int]:
    """Store the base decoder's projections and output head in `kind` (one of `QUANTIZATIONS`); adapters stay
    in full precision."""
    if kind == "int8":
        return quantize_int8(model)
    if kind == "int4":
        return quantize_int4(model)
    raise ValueError(f"quantize must be None or one of {list(QUANTIZATIONS)}, got {kind!r}")


def quantize_int8(model) -> dict[str, int]:
    """Quantize `model` (a `Phi4MMComposition`) in place: every decoder projection (LoRA-wrapped or not) and the
    output head. Returns the bytes of the quantized weights before and after."""
    return _quantize_base(model, Int8Weight, Int8Linear, "int8")


def quantize_int4(model) -> dict[str, int]:
    """`quantize_int8`'s pass with `Int4Weight` (group-wise weight-only int4): the same layers, adapters untouched.
    Returns the bytes of the quantized weights before and after."""
    return _quantize_base(model, Int4Weight, Int4Linear, "int4")


def _quantize_base(model, weight_format, linear_format, name: str) -> dict[str, int]:
    from .formats.shards import release_file_pages

    hf = model.hf
    before = after = 0
    layers = hf.model.layers
    for path, mod in list(layers.named_modules()):
        if isinstance(mod, LoraLinear) and mod.weight is not None and mod.weight.is_floating_point():
            before += mod.weight.numel() * mod.weight.element_size()
            source = mod.weight
            packable = PackedWeight.applies(source)  # bf16 on CPU: its adapters stay bf16, packed
            mod.set_base_format(weight_format(source, mod.bias))
            if packable:
                mod.set_adapter_format(adapter_factor)
            release_file_pages(source)  # read once to quantize; a mapped checkpoint's pages go back
            after += mod.base_nbytes
        elif type(mod) is nn.Linear:
            parent_path, _, attr = path.rpartition(".")
            parent = layers.get_submodule(parent_path) if parent_path else layers
            before += mod.weight.numel() * mod.weight.element_size()
            new = linear_format(mod)
            setattr(parent, attr, new)
            release_file_pages(mod.weight)
            after += new.base_nbytes
    head = hf.lm_head
    if isinstance(head, nn.Linear):
        before += head.weight.numel() * head.weight.element_size()
        hf.lm_head = linear_format(head)  # the embedding keeps its own (tied) weight for the look-up
        release_file_pages(head.weight)  # (a tied embedding's look-ups read the rows they need again)
        after += hf.lm_head.base_nbytes
    model.weight_format = name
    return {"bytes_before": before, "bytes_after": after}


# bytes: a tied output head up to this size gets its own packed copy (the embedding keeps the plain weight for
# look-ups). 0: never duplicated. At 209m the copy held 62.5 MiB more, and batch-1 decode was no faster with it
# (24.8 / 28.7 against 28.4 / 24.6 tok/s)
HEAD_PACK_LIMIT = 0


class AdapterFactor:
    """A LoRA factor (A `[r, in]` or B `[out, r]`) of a bf16 CPU layer, kept as it is, with no packed copy: up to
    `GemvKernel.MAX_ROWS` input rows (decode steps) through phimm's bf16 gemv kernel (`phimm/kernels/
    gemv_bf16.cpp`), which reads such small matrices from memory 1.1-1.5x faster than oneDNN reads its packed
    layout (`lora_into`, on A: the whole delta added into the layer's output in one call); more rows (prefill) through
    `F.linear` on the plain weight, which oneDNN runs in 0.8-1.0x the packed copy's time at a thousand rows."""

    def __init__(self, weight: torch.Tensor, kernel):
        self.weight = weight.contiguous()
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.numel() * weight.element_size()
        self.kernel = kernel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel.takes(x, self.weight):
            return self.kernel.gemv(x, self.weight)
        return nn.functional.linear(x, self.weight)

    def lora_into(self, x: torch.Tensor, b, out: torch.Tensor, alpha: float) -> bool:
        """As A: `out += alpha * B (this factor's product with x)` in one kernel call, where B is an `AdapterFactor`
        too and the kernel takes the tensors; False (nothing done) otherwise."""
        return isinstance(b, AdapterFactor) and self.kernel.lora_into(x, self.weight, b.weight, out, alpha)

    def dense(self) -> torch.Tensor:
        return self.weight


def adapter_factor(weight: torch.Tensor):
    """The format of a bf16 CPU layer's LoRA factors: `AdapterFactor` where phimm's gemv kernel can be had (AVX-512
    BF16), else `packed_adapter`."""
    from .kernels import gemv_kernel

    kernel = gemv_kernel()
    if kernel is None or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return packed_adapter(weight)
    return AdapterFactor(weight, kernel)


def packed_adapter(weight: torch.Tensor) -> "PackedWeight | None":
    """A LoRA factor (A `[r, in]` or B `[out, r]`) packed for oneDNN on its first call, as the base weights are:
    a batch-1 decode step reads it 1.3-2x faster than through plain bf16 matmuls. Its source pages are given
    back after packing where it was read from a mapped file (`release_file_pages`); the plain factor stays the
    mixed batches' source."""
    return PackedWeight(weight, None, lazy=True)


def _pack_head(hf, head: nn.Linear) -> bool:
    """Whether the output head gets a packed copy: always when untied; when tied to the input embedding, where
    the shared weight is read from a mapped file (packing gives its pages back: the look-ups read the few rows
    they need from the file again, so the copy does not double the head) or is small (`HEAD_PACK_LIMIT`)."""
    from .formats.shards import file_backed

    tied = head.weight is getattr(hf.get_input_embeddings(), "weight", None)
    return (not tied or head.weight.numel() * head.weight.element_size() <= HEAD_PACK_LIMIT
            or file_backed(head.weight))


def _fusable_activation(act) -> str | None:
    """`PackedWeight`'s name for an activation module oneDNN can apply inside the GEMM, else None."""
    from transformers.activations import GELUActivation, GELUTanh

    if isinstance(act, GELUTanh):
        return "gelu_tanh"  # the tanh approximation, as transformers' (fused or Python) one
    if type(act) is GELUActivation and getattr(act, "act", None) is nn.functional.gelu:
        return "gelu"
    if isinstance(act, nn.GELU):
        return {"tanh": "gelu_tanh", "none": "gelu"}.get(act.approximate)
    return None


# the encoders' transformer layers whose linear layers `pack_encoders` packs (module paths containing one of these)
ENCODER_LAYERS = (".image_embed.img_processor.encoder.", ".audio_embed.encoder.encoders.")


def pack_encoders(model, lazy: bool = True) -> int:
    """Pack the image and audio encoders' layers for oneDNN as the decoder's (bf16 on CPU, in place): every plain
    linear layer of their attention and MLPs, an MLP's GELU applied inside its first GEMM (`fc1`; a separate bf16
    GELU took a third of SigLIP's MLP time at the published widths: 10.5 of 29.4 ms a crop and layer, one core).
    Returns how many linear layers were packed. At the published widths an image request's time to first token
    is mostly SigLIP's 27 layers over every crop; audio frames are few (M of 50-200 rows), where a packed
    weight is read 1.4-1.5x faster than a plain one reordered at every call."""
    if model.dtype != torch.bfloat16 or model.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return 0
    n = 0
    for path, mod in list(model.hf.named_modules()):
        if not any(layer in f".{path}." for layer in ENCODER_LAYERS):
            continue
        fuse = _fusable_activation(getattr(mod, "activation_fn", None)) if hasattr(mod, "fc1") else None
        for name, lin in list(mod.named_children()):
            if type(lin) is not nn.Linear or not PackedWeight.applies(lin.weight):
                continue
            act = fuse if name == "fc1" else None
            setattr(mod, name, PackedLinear(lin, lazy=lazy, activation=act))
            if act is not None:
                mod.activation_fn = nn.Identity()
            n += 1
    return n


def pack_weights(model, lazy: bool = True) -> int:
    """Lay the decoder's bf16 projection weights out for oneDNN's matmul (CPU), in place; returns how many
    layers were (or, `lazy`, will be) packed. A no-op for other dtypes or devices. `lazy` (the default) packs each
    layer on its first forward, so loading a memory-mapped checkpoint reads none of its weights; the first request
    pays for reading and packing the layers it uses."""
    from adapters import find_targets, wrap_targets

    if model.dtype != torch.bfloat16 or model.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return 0
    from .model import PHI4MM_LORA_TARGETS

    paths = list(find_targets(model.hf, PHI4MM_LORA_TARGETS))  # paths only: the originals must not stay alive
    wrapped = wrap_targets(model.hf, paths)
    n = 0
    for mod in wrapped.values():
        if PackedWeight.applies(mod.weight):
            mod.set_base_format(PackedWeight(mod.weight, mod.bias, lazy=lazy))
            mod.set_adapter_format(adapter_factor)
            n += 1
    head = model.hf.lm_head
    if type(head) is nn.Linear and _pack_head(model.hf, head):
        model.hf.lm_head = PackedLinear(head, lazy=lazy)
        n += 1
    n += pack_encoders(model, lazy=lazy)
    model.weight_format = "packed"
    return n
