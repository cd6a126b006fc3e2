"""Essential 4: gradient clipping, between backward and the optimizer step, after fp16's gradients are unscaled.

The norm before clipping comes back as a tensor (no host sync): the loop logs it,
and its non-finite guard skips a step whose norm is inf or NaN.
"""

from __future__ import annotations
{%- if cookiecutter.loop == "plain" %}

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their total norm is at most ``max_norm`` (0: leave them alone).

    Returns the norm before clipping. Call it after ``scaler.unscale_``, so that it sees the true gradients.
    torch's own clipping, in its two halves, as torchtitan calls it under FSDP.
    """
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):  # FSDP's sharded gradients: the norm over every rank's shards
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
{%- else %}

import math
from typing import Any

import torch
from torch import nn


def clip_gradients(accelerator: Any, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their total norm is at most ``max_norm`` (0: leave them alone).

    Returns the norm before clipping. Accelerate's ``clip_grad_norm_`` unscales fp16's gradients first (once a
    step), then calls torch's clipping.
    """
    return accelerator.clip_grad_norm_(params, max_norm or math.inf)
{%- endif %}
