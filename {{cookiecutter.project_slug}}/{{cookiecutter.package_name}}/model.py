"""YOURS TO REPLACE: the model.

``build_model(cfg)`` returns an ``nn.Module`` mapping a batch of inputs to
logits. Anything works as long as the loss in ``task.py`` accepts its output.
"""

from __future__ import annotations

from torch import nn

from .config import Config


def build_model(cfg: Config) -> nn.Module:
    task = cfg.task  # this task's settings (task.py)
    return nn.Sequential(
        nn.Linear(task.input_dim, task.hidden_dim),
        nn.GELU(),
        nn.Dropout(task.dropout),
        nn.Linear(task.hidden_dim, task.hidden_dim),
        nn.GELU(),
        nn.Dropout(task.dropout),
        nn.Linear(task.hidden_dim, task.num_classes),
    )
