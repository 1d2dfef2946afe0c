"""One decoder forward that prefills joining rows while it decodes the running batch (a "mixed step").

Without it, a step with arrivals runs two forwards: the arrivals' prefill, then the decode of every running row.
On a small model, or with few rows, each forward costs mostly its fixed part (every layer's kernels called once,
whatever the rows), so under steady traffic, where a few requests arrive at almost every step, the prefills cost
as much as the decode steps. A mixed step runs both in one forward.

Its tokens are flattened to `[N, 1, D]`, one "row" per token: first the running rows' next tokens (one each), then
each joining row's prompt, its positions one after another. Everything but attention works on tokens alone
(norms, projections, rotary embeddings, MLPs, and LoRA: each token carries its row's adapter in the step's
`RowAdapters`). Attention is split by kind:

- the running rows' tokens attend over their rows of the batch cache (`BatchCache`), as a decode step does;
- each joining row's prompt attends causally over its own positions, as its prefill alone does (transformers'
  sdpa function on `[1, H, n, D]`, the call a one-row prefill makes).

Before the forward, `BatchCache.prepare_step` lays out the batch with the joining rows appended (in spare rows of
its buffers when they fit); each layer's `update` writes the step's keys and values where they belong (the running
rows' new column, each joining row's prompt right-aligned to the same edge), and `finish` counts them. If the forward fails, `abort` puts the batch's
cache back as it was.

`MixedStep` is the forward's cache (`cache=`); while it is `active()`, the decoder's attention function
(`phimm.attention.mixed_step_attention`) splits each layer's attention as above. Only decoders on that attention function take
mixed steps (`MixtureModel.mixed_steps`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .cache import BatchCache

_CURRENT: ContextVar["MixedStep | None"] = ContextVar("phimm_mixed_step", default=None)


def current() -> "MixedStep | None":
    """The mixed step whose forward runs in this context, if any."""
    return _CURRENT.get()


class _StepLayer(DynamicLayer):
    """Layer `index` of a mixed step's cache: writes the step's keys and values into the batch cache and hands
    them back unchanged (attention reads what it needs from the step). Reports no cached positions, so
    the decoder builds no mask over the batch's width."""

    def __init__(self, step: "MixedStep", index: int):
        super().__init__()
        self.step, self.index = step, index

    def update(self, key_states, value_states, *args, **kwargs):
        self.step.write(self.index, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0


class MixedStep(Cache):
    """The cache of one mixed forward over `batch`'s running rows (one new token each) and joining rows of
    `new_lengths` prompt positions. Token order of the forward: the running rows', then each joining row's
    prompt."""

    def __init__(self, batch: BatchCache, new_lengths: Sequence[int]):
        super().__init__(layers=[_StepLayer(self, i) for i in range(len(batch.layers))])
        self.batch = batch
        self.n_decode = batch.rows
        self.old_lengths = list(batch.lengths)
        self.new_lengths = [int(n) for n in new_lengths]
        self.width, self._before = batch.prepare_step(self.new_lengths)
        self.segments: list[tuple[int, int, int]] = []  # (row in the batch, first token, length) per joining row
        start = self.n_decode
        for j, n in enumerate(self.new_lengths):
            self.segments.append((self.n_decode + j, start, n))
            start += n
        self.tokens = start
        self._decode_mask: torch.Tensor | None = None

    # ---- the forward's inputs ------------------------------------------------------------------------------
    def positions(self, device=None) -> torch.Tensor:
        """`[N, 1]` position id of each token of the forward."""
        parts = [torch.tensor(self.old_lengths, dtype=torch.long, device=device)]
        parts += [torch.arange(n, dtype=torch.long, device=device) for n in self.new_lengths]
        return torch.cat(parts)[:, None]

    def last_tokens(self) -> list[int]:
        """Index of each row's last token in the forward (the running rows', then the joining rows'): where its
        logits are read."""
        return list(range(self.n_decode)) + [s + n - 1 for _, s, n in self.segments]

    def decode_mask(self, device) -> torch.Tensor:
        """`[n_decode, 1, 1, width]` (True: attend): each running row's cached columns and its new one."""
        if self._decode_mask is None:
            lengths = torch.tensor(self.old_lengths, device=device) + 1
            cols = torch.arange(self.width, device=device)
            self._decode_mask = (cols[None, :] >= (self.width - lengths)[:, None])[:, None, None, :]
        return self._decode_mask

    @contextmanager
    def active(self) -> Iterator["MixedStep"]:
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)

    # ---- inside the forward --------------------------------------------------------------------------------
    def write(self, index: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Put layer `index`'s new keys and values `[N, Hkv, 1, D]` into the batch cache."""
        layer = self.batch.layers[index]
        kb, vb = layer.key_buf, layer.value_buf
        nd, w = self.n_decode, self.width
        if nd:
            kb[:nd, :, w - 1] = key[:nd, :, 0]
            vb[:nd, :, w - 1] = value[:nd, :, 0]
        for row, s, n in self.segments:
            kb[row, :, w - n:w] = key[s:s + n, :, 0].transpose(0, 1)
            vb[row, :, w - n:w] = value[s:s + n, :, 0].transpose(0, 1)

    def decode_keys(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s keys and values of the running rows `[n_decode, Hkv, width, D]`, this step's included."""
        layer = self.batch.layers[index]
        return layer.key_buf[:self.n_decode, :, :self.width], layer.value_buf[:self.n_decode, :, :self.width]

    # ---- after the forward ---------------------------------------------------------------------------------
    def finish(self) -> None:
        """Count what the forward wrote: the running rows one position more, the joining rows theirs."""
        self.batch.commit_step(self.width, [n + 1 for n in self.old_lengths] + self.new_lengths)
        self._before = None  # nothing to undo now

    def abort(self) -> None:
        """The forward failed: the batch's cache as it was before the step."""
        if self._before is not None:
            self.batch.restore(self._before)
            self.batch.lengths = list(self.old_lengths)
            self._before = None
