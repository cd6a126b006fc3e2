"""YOURS TO REPLACE: the model.

``build_model(cfg)`` returns an ``nn.Module`` mapping a batch of inputs to
logits. Anything works as long as the loss in ``task.py`` accepts its output.
"""

from __future__ import annotations

from torch import nn

from .config import Config


def build_model(cfg: Config) -> nn.Module:
    return nn.Sequential(
        nn.Linear(cfg.input_dim, cfg.hidden_dim),
        nn.GELU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden_dim, cfg.hidden_dim),
        nn.GELU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden_dim, cfg.num_classes),
    )
