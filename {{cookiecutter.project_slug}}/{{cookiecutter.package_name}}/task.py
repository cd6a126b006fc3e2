"""YOURS TO REPLACE: the task's settings, its loss and its metrics, in one place.

The loop relies on this contract, whatever the task:

- ``TaskConfig``: the task's own settings, the ``task:`` group of the config
  (``task.num_classes=8`` on the command line). data.py and model.py read them
  as ``cfg.task.<name>``; ``check_task_config`` says what is wrong with them,
  once the YAML and the command line are applied (not ``__post_init__``, which
  sees only the defaults).
- ``compute_loss(output, target)`` returns ``(sum, count)``: the loss SUMMED
  over its terms (samples, tokens, pixels...) and how many terms there are. The
  loop divides the step's total sum by its total count, over every micro-batch
  and every process, so accumulation and torchrun are exact even when batches
  hold different numbers of terms (padding, masked targets). A batch with no
  terms gives (0, 0) and adds nothing.
- ``metric_totals(output, target, task)`` returns, per validation batch,
  tensors that ADD UP over batches and processes (sums, counts, a confusion
  matrix...); ``compute_metrics(totals, task)`` turns the totals over the whole
  validation set into the reported metrics, once per evaluation. ``task`` is
  ``cfg.task``, these settings.
- ``METRIC_GOALS`` says which way each metric improves: ``best.pt`` follows the
  config's ``monitor`` in that direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

METRIC_GOALS = {"val_loss": "min", "val_acc": "max"}  # min: lower is better; max: higher is better


@dataclass
class TaskConfig:
    """The stand-in task's settings (data.py, model.py): Gaussian clusters, an MLP classifier."""

    num_classes: int = 4
    input_dim: int = 16
    train_size: int = 4096
    val_size: int = 1024
    hidden_dim: int = 64
    dropout: float = 0.1


def check_task_config(task: TaskConfig) -> list[str]:
    """What is wrong with these settings, one message each (none: all is well)."""
    problems = [
        f"task.{key} must be >= 1, got {getattr(task, key)}"
        for key in ("num_classes", "input_dim", "train_size", "val_size", "hidden_dim")
        if getattr(task, key) < 1
    ]
    if not 0 <= task.dropout < 1:
        problems.append(f"task.dropout must be in [0, 1), got {task.dropout}")
    return problems


def compute_loss(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int | torch.Tensor]:
    return F.cross_entropy(output.float(), target, reduction="sum"), target.numel()


def metric_totals(output: torch.Tensor, target: torch.Tensor, task: TaskConfig) -> dict[str, torch.Tensor | int]:
    return {
        "loss": F.cross_entropy(output.float(), target, reduction="sum"),
        "correct": (output.argmax(dim=-1) == target).sum(),
        "samples": target.numel(),
    }


def compute_metrics(totals: dict[str, torch.Tensor], task: TaskConfig) -> dict[str, torch.Tensor]:
    return {"val_loss": totals["loss"] / totals["samples"], "val_acc": totals["correct"] / totals["samples"]}
