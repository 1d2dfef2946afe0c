"""Weight formats of the frozen base's linear layers, and the passes that put a model in one.

A format is an object standing in for a layer's weight and bias: `fmt(x) -> x W^T + b`, with `nbytes`. A
`LoraLinear` calls whichever format it holds (`set_base_format`); a plain `nn.Linear` (the output head) becomes a
`FormatLinear`. The model records its format in one field, `weight_format` ("dense", "packed" or "int8").

- `PackedWeight`: bf16 re-laid out for oneDNN's matmul on CPU (read 1.3-1.5x faster at decode batch sizes),
  packed on its first call so that loading reads no weights.
- `Int8Weight`: int8 with LoRA adapters in full precision, below.

Weights are stored as int8 with one scale per output channel (symmetric, absmax / 127), 0.25x fp32 or 0.5x
bf16 bytes. On CPU the matmul runs in fbgemm's int8 kernels: each input row is quantized on the fly (one scale
per row, the `linear_dynamic` path) so the product is an int8 x int8 dot with an fp32 result; the weight-only
`_weight_int8pack_mm` kernel is the fallback where fbgemm is missing. Only the decoder's projections and the
output head are quantized: the encoders, projectors, norms and embeddings keep their dtype.
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


class Int8Weight:
    """A frozen weight in int8 and the kernel that multiplies by it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_weight(weight)
        self.bias = None if bias is None else bias.detach().float()
        self.use_fbgemm = _fbgemm_ok() and weight.device.type == "cpu"
        if self.use_fbgemm:
            torch.backends.quantized.engine = "fbgemm"
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, self.bias)
        else:
            self.q, self.scale = q, scale
        self.nbytes = q.numel() + scale.numel() * 4  # int8 values + fp32 scales

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.use_fbgemm:
            y = torch.ops.quantized.linear_dynamic(x2.float(), self.packed, False)  # VNNI: full 8-bit range
        else:
            act = x2 if x2.dtype in (torch.bfloat16, torch.float16) else x2.to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(act, self.q, self.scale.to(act.dtype)).float()
            if self.bias is not None:
                y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


class PackedWeight:
    """A frozen bf16 CPU weight in oneDNN's blocked layout. `lazy`: keep the source (a memory-mapped tensor is not
    read) and pack on the first call, after which the source is dropped."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, lazy: bool = True):
        self.out_features, self.in_features = weight.shape
        self.source: torch.Tensor | None = weight.detach()
        self.bias = bias
        self.packed: torch.Tensor | None = None
        self.nbytes = weight.numel() * weight.element_size()
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
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.source, 1)
        self.nbytes = self.packed.numel() * self.packed.element_size()
        self.source = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            self.pack()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


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


class PackedLinear(FormatLinear):
    """A bf16 `nn.Linear` packed for oneDNN (kept by name: `FormatLinear(base, PackedWeight(...))`). The tied
    output head's packed copy leaves the embedding its own weight for look-ups."""

    def __init__(self, base: nn.Linear, lazy: bool = False):
        super().__init__(base, PackedWeight(base.weight, base.bias, lazy=lazy))


QUANTIZATIONS = ("int8",)


def quantize(model, kind: str) -> dict[str, int]:
    """Store the base decoder's projections and output head in `kind` (one of `QUANTIZATIONS`); adapters stay
    in full precision."""
    if kind == "int8":
        return quantize_int8(model)
    raise ValueError(f"quantize must be None or one of {list(QUANTIZATIONS)}, got {kind!r}")


def quantize_int8(model) -> dict[str, int]:
    """Quantize `model` (a `Phi4MMComposition`) in place: every decoder projection (LoRA-wrapped or not) and the
    output head. Returns the bytes of the quantized weights before and after."""
    hf = model.hf
    before = after = 0
    layers = hf.model.layers
    for path, mod in list(layers.named_modules()):
        if isinstance(mod, LoraLinear) and mod.weight is not None and mod.weight.is_floating_point():
            before += mod.weight.numel() * mod.weight.element_size()
            mod.set_base_format(Int8Weight(mod.weight, mod.bias))
            after += mod.base_nbytes
        elif type(mod) is nn.Linear:
            parent_path, _, attr = path.rpartition(".")
            parent = layers.get_submodule(parent_path) if parent_path else layers
            before += mod.weight.numel() * mod.weight.element_size()
            new = Int8Linear(mod)
            setattr(parent, attr, new)
            after += new.base_nbytes
    head = hf.lm_head
    if isinstance(head, nn.Linear):
        before += head.weight.numel() * head.weight.element_size()
        hf.lm_head = Int8Linear(head)  # the embedding keeps its own (tied) weight for the look-up
        after += hf.lm_head.base_nbytes
    model.weight_format = "int8"
    return {"bytes_before": before, "bytes_after": after}


HEAD_PACK_LIMIT = 256 * 1024 * 1024  # bytes: a larger tied head is not duplicated


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
            n += 1
    head = model.hf.lm_head
    if type(head) is nn.Linear and head.weight.numel() * head.weight.element_size() <= HEAD_PACK_LIMIT:
        model.hf.lm_head = PackedLinear(head, lazy=lazy)
        n += 1
    model.weight_format = "packed"
    return n
