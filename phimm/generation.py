"""Generation options and the prefill / decode loop over a batch whose rows each carry their own route."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
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


def _from_generation_config(gc) -> dict:
    out = {}
    for name in ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                 "repetition_penalty", "eos_token_id"):
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


@dataclass
class Step:
    """One decode step of a batch: each active row's new token (and raw logits when asked for)."""

    index: int
    tokens: list[int]  # per row; meaningless for rows already finished
    finished: list[bool]  # per row, after this step
    logits: torch.Tensor | None
    time: float


def prefill_groups(input_ids: Sequence[Sequence[int]], adapters: Sequence[str | None]) -> list[list[int]]:
    """Rows that can be prefilled together without padding: same length and same adapter (in first-seen order)."""
    groups: dict[tuple[int, str | None], list[int]] = {}
    for i, (ids, adapter) in enumerate(zip(input_ids, adapters)):
        groups.setdefault((len(ids), adapter), []).append(i)
    return list(groups.values())


def run_batch(model, input_ids: Sequence[Sequence[int]], embeds_fn, adapters: Sequence[str | None],
              opts: GenerationOptions, eos_ids: Sequence[int], pad_id: int) -> Iterator[Step]:
    """Generate for a batch whose rows each have their own adapter; yields after every step.

    Prefill runs per group of equal-length rows on one adapter (no padding is computed, and each row sees
    exactly what it would alone); the rows' caches are then merged, left-padded and masked, and decoding runs
    all rows together, each with its own adapter. `embeds_fn(rows, ids [k, T]) -> [k, T, D]` builds input
    embeddings (tokens with media features scattered in) for the given row indices.
    """
    from .cache import PreallocatedCache

    device = model.device
    B = len(input_ids)
    lengths = [len(x) for x in input_ids]
    n_layers = model.config.num_hidden_layers
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    generator = None
    if opts.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(opts.seed if opts.seed is not None else torch.seed())

    # ---- prefill ----
    logits = [None] * B
    row_cache: list[tuple[object, int]] = [None] * B  # (cache, row inside it)
    single = B == 1
    for rows in prefill_groups(input_ids, adapters):
        ids = torch.tensor([input_ids[i] for i in rows], dtype=torch.long, device=device)
        k, T = ids.shape
        cache = PreallocatedCache(n_layers, T + (opts.max_new_tokens if single else 0))
        model.set_row_adapters([adapters[rows[0]]] * k)
        pos = torch.arange(T, device=device).expand(k, T)
        hidden = model.decode(embeds_fn(rows, ids), torch.ones_like(ids), pos, cache)
        last = model.logits(hidden[:, -1])  # [k, V]
        for j, i in enumerate(rows):
            logits[i] = last[j]
            row_cache[i] = (cache, j)
    logits = torch.stack(logits)
    if single:
        cache = row_cache[0][0]
    else:
        cache = PreallocatedCache.from_rows([c for c, _ in row_cache], [j for _, j in row_cache], lengths,
                                            extra=opts.max_new_tokens)
    T = max(lengths)
    mask = torch.zeros((B, T + opts.max_new_tokens), dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        mask[i, T - n:T] = 1
    next_pos = torch.tensor(lengths, dtype=torch.long, device=device)[:, None]  # [B, 1]

    # ---- decode ----
    model.set_row_adapters(adapters)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    generated = torch.empty((B, 0), dtype=torch.long, device=device)
    try:
        for step in range(opts.max_new_tokens):
            raw = logits.float()
            scores = process_logits(raw, generated, step, opts, eos)
            tokens = choose(scores, opts, generator)
            tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
            generated = torch.cat([generated, tokens[:, None]], dim=1)
            finished = finished | torch.isin(tokens, eos)
            done = bool(finished.all()) or step == opts.max_new_tokens - 1
            yield Step(step, tokens.tolist(), finished.tolist(), raw if opts.output_logits else None,
                       time.perf_counter())
            if done:
                break
            mask[:, T + step] = 1
            hidden = model.decode(model.embed_tokens(tokens[:, None]), mask[:, : T + step + 1], next_pos, cache)
            logits = model.logits(hidden[:, -1])
            next_pos = next_pos + 1
    finally:
        model.rows.clear()
