"""The training loop every stage shares: a cosine learning-rate schedule with warm-up, one optimiser step per
training step (optionally with the gradient norm clipped to 1), a log record every few steps, and (for the stages
that resume) a checkpoint every minute.

    last_loss = train_loop(stage, opt, steps, step_fn, peak=2e-3, warmup=100, desc="ctc", clip=params)

`step_fn(step) -> (loss, fields)`: the loss to minimise and the log record's other fields (a dict, or a callable
returning one, called only on the steps that log). The record is `{phase?, step, loss: round(loss, 4), **fields}`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch


def cosine_lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up over `warmup` steps to `peak`, then a cosine down to 5 % of it at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def progress(iterable, total: int | None = None, desc: str = "", initial: int = 0, mininterval: float = 5):
    """A tqdm progress bar over `iterable`, silent with PHIMM_TRAIN_QUIET=1."""
    from tqdm import tqdm

    return tqdm(iterable, initial=initial, total=total, desc=desc, mininterval=mininterval,
                disable=os.environ.get("PHIMM_TRAIN_QUIET") == "1")


def loop(stage, steps: int, start: int, desc: str):
    """Steps `start` .. `steps - 1` with a progress bar named `{stage}:{desc}`."""
    return progress(range(start, steps), total=steps, desc=f"{stage.name}:{desc}", initial=start)


def train_loop(stage, opt, steps: int, step_fn: Callable, *, peak: float | Sequence[float], warmup: int, desc: str,
               start: int = 0, clip: Sequence[torch.Tensor] | None = None, log_every: int = 10,
               phase: str | None = None, loss_key: str = "loss", digits: int = 4,
               after_step: Callable[[int], None] | None = None, checkpoint: dict | None = None, timer=None):
    """Steps `start` .. `steps - 1` of `stage`; the last step's loss (None when no step ran).

    Each step: every parameter group's learning rate `cosine_lr(step, steps, peak, warmup)` (`peak`: one for all
    groups, or one per group), `step_fn(step)`, zero the gradients, backward, clip the norm of `clip`'s gradients
    to 1 (if given), `opt.step()`. Every `log_every` steps and at the last one `stage.log(phase=phase, step=step,
    {loss_key}=round(loss, digits), **fields)` (no phase when None). Then `after_step(step)`, and with
    `checkpoint` ({name: module}) a resumable `stage.checkpoint` of those modules and the optimiser when one is
    due (`timer()`: the stage's wall time so far)."""
    peaks = [peak] * len(opt.param_groups) if isinstance(peak, (int, float)) else list(peak)
    if len(peaks) != len(opt.param_groups):
        raise ValueError(f"{len(peaks)} peak learning rates for {len(opt.param_groups)} parameter groups")
    loss = None
    for step in loop(stage, steps, start, desc):
        for g, p in zip(opt.param_groups, peaks):
            g["lr"] = cosine_lr(step, steps, p, warmup=warmup)
        loss, fields = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            head = {"phase": phase} if phase is not None else {}
            stage.log(**head, step=step, **{loss_key: round(loss.item(), digits)},
                      **(fields() if callable(fields) else fields))
        if after_step is not None:
            after_step(step)
        if checkpoint is not None and stage.due():
            stage.checkpoint(step + 1, timer(), opt, **checkpoint)
    return loss


def with_acc(fn: Callable) -> Callable:
    """The step function of `fn(step) -> (loss, accuracy)`: the accuracy logged as `acc` (4 digits)."""

    def step_fn(step: int):
        loss, acc = fn(step)
        return loss, {"acc": round(acc, 4)}

    return step_fn
