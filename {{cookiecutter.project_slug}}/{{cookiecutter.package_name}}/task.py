"""YOURS TO REPLACE: the loss and the metrics, in one place.

``compute_loss`` must return the MEAN loss over the batch: gradient
accumulation divides it by ``accum_steps`` to equal one bigger batch.
``metric_sums`` returns per-batch SUMS (not means) as tensors, so evaluation
can add them up over batches (and processes) and divide once at the end:
``val_loss`` and ``val_acc`` below are weighted exactly by sample count.
``METRIC_GOALS`` says which way each metric improves: ``best.pt`` follows
the config's ``monitor`` in that direction.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

METRIC_GOALS = {"val_loss": "min", "val_acc": "max"}  # min: lower is better; max: higher is better


def compute_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.float(), target)


def metric_sums(output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the batch; evaluation reports each as sum / number of samples."""
    return {
        "val_loss": F.cross_entropy(output.float(), target, reduction="sum"),
        "val_acc": (output.argmax(dim=-1) == target).sum(),
    }
