"""Generation options, and the logits processing and token choice of one step (the engine runs the loop)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .errors import GenerationConfigError


@dataclass(frozen=True)
class GenerationOptions:
    """Options as in transformers' `GenerationConfig` (the subset phimm honours). Greedy by default."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] | None = None  # None: the model's
    seed: int | None = None
    output_logits: bool = False
    stop_strings: tuple[str, ...] = ()  # the answer ends before the first of these (not included in its text)

    @classmethod
    def from_kwargs(cls, base: "GenerationOptions | None" = None, **kwargs) -> "GenerationOptions":
        """Apply overrides (also accepts `generation_config=` a transformers GenerationConfig) and validate."""
        opts = base or cls()
        gc = kwargs.pop("generation_config", None)
        if gc is not None:
            kwargs = {**_from_generation_config(gc), **kwargs}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise GenerationConfigError(f"unknown generation option(s) {unknown}; known: {sorted(names)}")
        if "eos_token_id" in kwargs and kwargs["eos_token_id"] is not None:
            e = kwargs["eos_token_id"]
            kwargs["eos_token_id"] = (int(e),) if isinstance(e, int) else tuple(int(x) for x in e)
        if kwargs.get("stop_strings") is not None:
            stop = kwargs["stop_strings"]
            kwargs["stop_strings"] = (stop,) if isinstance(stop, str) else tuple(stop)
        opts = dataclasses.replace(opts, **kwargs)
        opts.validate()
        return opts

    def validate(self) -> None:
        def bad(msg):
            raise GenerationConfigError(msg)

        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad(f"min_new_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            bad(f"temperature must be >= 0, got {self.temperature!r}")
        if self.do_sample and self.temperature == 0:
            bad("temperature 0 with do_sample=True: use do_sample=False for greedy decoding")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            bad(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not all(isinstance(x, str) and x for x in self.stop_strings):
            bad(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy_unprocessed(self) -> bool:
        """Greedy with no repetition penalty: each token is the argmax of the raw logits, but for the end tokens
        masked before `min_new_tokens`."""
        return not self.do_sample and self.repetition_penalty == 1.0

    def argmax_at(self, step: int) -> bool:
        """Whether step `step`'s token is the plain argmax of the raw logits (greedy, nothing to process)."""
        return self.greedy_unprocessed and step >= self.min_new_tokens


def _from_generation_config(gc) -> dict:
    out = {}
    for name in ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                 "repetition_penalty", "eos_token_id", "stop_strings"):
        v = getattr(gc, name, None)
        if v is not None:
            out[name] = v
    return out


def process_logits(logits: torch.Tensor, generated: torch.Tensor | None, step: int, opts: GenerationOptions,
                   eos: torch.Tensor) -> torch.Tensor:
    """Apply repetition penalty, min_new_tokens and temperature / top-k / top-p to `[B, V]` logits (fp32)."""
    logits = logits.float()
    if opts.repetition_penalty != 1.0 and generated is not None and generated.numel():
        score = logits.gather(1, generated)
        score = torch.where(score < 0, score * opts.repetition_penalty, score / opts.repetition_penalty)
        logits = logits.scatter(1, generated, score)
    if step < opts.min_new_tokens and eos.numel():
        logits = logits.index_fill(1, eos, float("-inf"))
    if not opts.do_sample:
        return logits
    logits = logits / max(opts.temperature, 1e-6)
    if opts.top_k:
        k = min(opts.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > opts.top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def choose(logits: torch.Tensor, opts: GenerationOptions, generator: torch.Generator | None) -> torch.Tensor:
    if not opts.do_sample:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
