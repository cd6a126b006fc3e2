"""Essential 5: the learning-rate schedule, one value per optimizer step.

All four shapes are plain functions of the step, so the value at any step is
easy to test and the scheduler's whole state is one number, the step:
- warmup_cosine: linear warmup from 0 to lr, then cosine decay to min_lr (transformers).
- onecycle: cosine ramp from lr/25 up to lr over warmup_steps, then cosine
  anneal to min_lr (the learning-rate shape of OneCycle, for fine-tuning).
  Both reach min_lr at ``decay_steps`` (0: at max_steps), and stay there.
- step: linear warmup, then lr * lr_gamma ** (steps_after_warmup // lr_step_size) (classic CNNs).
- wsd (warmup-stable-decay): linear warmup, lr held, then a linear cooldown to min_lr over the last
  ``cooldown_steps`` before ``decay_steps`` (0: max_steps). A run resumed with a larger max_steps from
  before its cooldown goes on at lr and cools down at its new end, as if it had been asked for that
  length from the start: a run can be extended.

The loop calls ``scheduler.step()`` once per optimizer step, after the step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import Config

ONECYCLE_START_DIV = 25.0  # OneCycle's conventional initial lr = lr / 25


def _cosine(progress: float, start: float, end: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def decay_horizon(cfg: Config) -> int:
    """The step at which warmup_cosine and onecycle reach min_lr: ``decay_steps``, or ``max_steps`` if 0."""
    return cfg.decay_steps or cfg.max_steps


def cooldown_start(cfg: Config) -> int:
    """wsd: the step at which the lr leaves its peak (it reaches min_lr ``cooldown_steps`` later)."""
    return decay_horizon(cfg) - cfg.cooldown_steps


def lr_at(step: int, cfg: Config) -> float:
    """The learning rate used for optimizer step ``step`` (0-based)."""
    warmup, total = cfg.warmup_steps, decay_horizon(cfg)
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
    if cfg.lr_schedule == "wsd":
        cooled = min(max(step - cooldown_start(cfg), 0) / cfg.cooldown_steps, 1.0)
        return cfg.lr - (cfg.lr - cfg.min_lr) * cooled
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}")


class Schedule:
    """Sets every param group's lr to ``lr_at(step)`` (scaled by the group's own initial lr, if it differs).

    The same interface as torch's LR schedulers (``step``, ``get_last_lr``,
    ``state_dict``, ``load_state_dict``), at a fraction of their per-step cost.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Config):
        self.optimizer, self.cfg, self.step_count = optimizer, cfg, 0
        self.base_factors = [group["lr"] / cfg.lr for group in optimizer.param_groups]
        self._apply()

    def _apply(self) -> None:
        lr = lr_at(self.step_count, self.cfg)
        for group, factor in zip(self.optimizer.param_groups, self.base_factors, strict=True):
            group["lr"] = lr * factor

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> Schedule:
    return Schedule(optimizer, cfg)
