"""Essential 5: the learning-rate schedule, one value per optimizer step.

All three shapes are plain functions of the step, wrapped in a LambdaLR, so
the value at any step is easy to test and the scheduler state is two numbers:
- warmup_cosine: linear warmup from 0 to lr, then cosine decay to min_lr (transformers).
- onecycle: cosine ramp from lr/25 up to lr over warmup_steps, then cosine
  anneal to min_lr (the learning-rate shape of OneCycle, for fine-tuning).
- step: linear warmup, then lr * lr_gamma ** (steps_after_warmup // lr_step_size) (classic CNNs).

The loop calls ``scheduler.step()`` once per optimizer step, after the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import Config

ONECYCLE_START_DIV = 25.0  # OneCycle's conventional initial lr = lr / 25


def _cosine(progress: float, start: float, end: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def lr_at(step: int, cfg: Config) -> float:
    """The learning rate used for optimizer step ``step`` (0-based)."""
    warmup, total = cfg.warmup_steps, cfg.max_steps
    if cfg.lr_schedule == "onecycle":
        if step < warmup:
            return _cosine(step / warmup, cfg.lr / ONECYCLE_START_DIV, cfg.lr)
        return _cosine((step - warmup) / max(1, total - warmup), cfg.lr, cfg.min_lr)
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    if cfg.lr_schedule == "warmup_cosine":
        return _cosine((step - warmup) / max(1, total - warmup), cfg.lr, cfg.min_lr)
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_gamma ** ((step - warmup) // cfg.lr_step_size)
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    # LambdaLR multiplies each group's initial lr by this factor.
    factor: Callable[[int], float] = lambda step: lr_at(step, cfg) / cfg.lr  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
