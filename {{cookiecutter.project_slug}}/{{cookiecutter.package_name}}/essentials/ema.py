"""Weight EMA (``ema_decay``): an exponential moving average of the weights, which evaluation uses.

After each optimizer step, ``average = ema_decay * average + (1 - ema_decay) * weights``: one foreach
lerp on the device per step (torch.optim.swa_utils's ``get_ema_multi_avg_fn``), no host sync. For the
first ``ema_start`` steps the average follows the weights. Training never reads it: its losses are
those of the weights themselves. Evaluation, ``best.pt``, snapshots, ``evaluate`` and ``export`` use
the average; ``last`` holds both, so a resumed run continues the average exactly.

It costs one more copy of the trainable weights on the device (under FSDP, of this process's shards:
each process averages its own), and while an evaluation runs the weights and the average trade places
one tensor at a time (``swapped_in``).

Not torch's ``AveragedModel``: it deep-copies the module (under DDP, FSDP or torch.compile, the wrapper
too) and reads its update counter on the host at every update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn

# What DDP (and Accelerate's DDP) and torch.compile put in front of a parameter's name; the average is saved
# under the model's own names, as its weights are.
WRAPPERS = ("module.", "_orig_mod.")


def own_name(name: str) -> str:
    while name.startswith(WRAPPERS):
        name = name.partition(".")[2]
    return name


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter or of its average: its shard under FSDP (a DTensor), else all of it."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class WeightEMA:
    """The average of ``model``'s trainable weights (none when ``decay`` is 0), by the model's parameter names."""

    def __init__(self, model: nn.Module, decay: float, start: int):
        self.decay, self.start = decay, start
        named = [(own_name(name), p) for name, p in model.named_parameters() if p.requires_grad] if decay else []
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.average = [p.detach().clone() for p in self.params]  # DTensors under FSDP: this process's shards
        self.move_towards = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (0 for the first): the average moves towards the weights."""
        if not self.average:
            return
        averages, weights = [local(a) for a in self.average], [local(p).detach() for p in self.params]
        if step < self.start:
            torch._foreach_copy_(averages, weights)
        else:
            self.move_towards(averages, weights, None)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block, its own weights again after it (nothing when off)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for p, a in zip(self.params, self.average, strict=True):
            weights, average = local(p), local(a)
            held = weights.clone()  # one tensor at a time: the memory of the largest, not of the model
            weights.copy_(average)
            average.copy_(held)

    def state_dict(self, whole: bool = True) -> dict[str, torch.Tensor]:
        """By parameter name. ``whole``: gathered (FSDP: every process calls it; the result counts on rank 0's),
        otherwise this process's shards, as DTensors, for a sharded checkpoint."""
        if not whole:
            return dict(zip(self.names, self.average, strict=True))
        return {
            name: a.full_tensor().cpu() if isinstance(a, DTensor) else a
            for name, a in zip(self.names, self.average, strict=True)
        }

    @torch.no_grad()
    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        """A saved average, whole or this process's shards; None (a checkpoint saved without it): the weights."""
        for name, p, average in zip(self.names, self.params, self.average, strict=True):
            value = p.detach() if saved is None else saved[name]
            if isinstance(average, DTensor) and not isinstance(value, DTensor):  # whole: this process's shard of it
                value = distribute_tensor(
                    value.to(average.device), average.device_mesh, average.placements, src_data_rank=None
                )
            average.copy_(value)
