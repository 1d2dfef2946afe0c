"""The decoder's RMSNorm through phimm's one-pass CPU kernel (`phimm/kernels/rms_norm.cpp`).

transformers' Llama-family RMSNorm (`weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`) runs as six tensor ops,
five of them over an fp32 copy of the input: in a prefill of thousands of tokens at the 209m bench size those
passes cost more than the arithmetic (the kernel: 4-5x faster on 1,079 x 1,024 bf16). `use_for_decoder(model)`
gives each such bf16 norm of the decoder stack (its layers' and the final one) a forward that calls the kernel
where it takes the input (CPU, bf16, the weight in bf16, no gradient to keep) and the module's own forward
otherwise (training, other devices). Same formula; only the order of the sum of squares differs (rarely one bf16
rounding of an output), and each row is computed alone, so a batch's rows stay equal to the same requests alone.
Norms loaded in fp32 keep transformers' forward, and the kernel is not built for them: there phimm's text route
is bit-identical to the base model loaded by transformers, and a different summation order would change fp32's
last bit (the kernel itself computes fp32 too; its tests use it).

Only norm classes whose forward is that formula are changed (`CLASSES`); others (Gemma's `1 + weight`, for one)
keep theirs. `ENABLED = False` before loading leaves every norm as transformers made it.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .kernels import norm_kernel

# the switch `MixtureModel.__init__` reads
ENABLED = True
# transformers' norm classes whose forward is `weight * (x * rsqrt(mean(x^2) + eps)).to(input dtype)` on an fp32
# copy of x, with the epsilon in `variance_epsilon`
CLASSES = ("Phi4MultimodalRMSNorm", "Phi3RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    kernel = norm_kernel()
    if hidden_states.dtype == torch.bfloat16 and kernel is not None and kernel.takes(hidden_states, self.weight):
        return kernel.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def use_for_decoder(decoder: nn.Module) -> int:
    """Give the bf16 RMSNorms of `decoder` (a transformers decoder stack: `layers` and `norm`) the kernel's forward;
    returns how many were changed (0 where the kernel cannot be had, the classes are not `CLASSES`, or the norms
    are not bf16: an fp32 model neither builds nor calls the kernel)."""
    roots = [m for m in (getattr(decoder, "layers", None), getattr(decoder, "norm", None)) if m is not None]
    norms = [module for root in roots for module in root.modules()
             if type(module).__name__ in CLASSES and hasattr(module, "variance_epsilon")
             and getattr(module, "weight", None) is not None and module.weight.dtype == torch.bfloat16]
    if not norms or norm_kernel() is None:
        return 0
    for module in norms:
        module.forward = types.MethodType(_fused_forward, module)
    return len(norms)


def uses_kernel(module: nn.Module) -> bool:
    """Whether `module`'s forward is the kernel's (`use_for_decoder`)."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _fused_forward
