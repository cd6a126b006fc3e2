"""What training costs, in every train record of metrics.jsonl (and the progress line, TensorBoard, trackers).

- ``tokens_per_s``: the task's terms (the count ``compute_loss`` returns: tokens, samples, pixels...) trained
  per second, over every process.
- ``peak_memory_mb``: the most memory rank 0 has held so far: on a GPU, CUDA's peak allocated by tensors
  (``torch.cuda.max_memory_allocated``); on a CPU, the process's peak resident memory (``ru_maxrss``).
- ``mfu`` (model FLOPs utilization), when ``peak_flops`` is set: the FLOPs of one optimizer step's forwards and
  backwards on a process, times steps per second, over ``peak_flops``, its device's peak FLOP/s in the precision
  trained in (docs/gpus.md has a table). The FLOPs are counted once, at start, by
  ``torch.utils.flop_counter.FlopCounterMode`` on a copy of the model on the meta device (no memory, no
  arithmetic, no random draws), fed a validation batch: the matrix products, convolutions and attention,
  which is what MFU counts, not the elementwise work.

All three are read between steps, from host-side counters and clocks: no device sync.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)

MEASURED = ("tokens_per_s", "peak_memory_mb", "mfu")  # timings and memory: they differ between equal runs


def count_flops(
    build_model: Callable,
    cfg: Any,
    batch: tuple[torch.Tensor, torch.Tensor],
    compute_loss: Callable,
) -> int | None:
    """FLOPs of one micro-batch's forward and backward (``batch``: inputs and targets), counted on a copy of the
    model built on the meta device; None, with a warning, when the model cannot run there."""
    try:
        with torch.device("meta"):
            model = build_model(cfg)
        inputs, targets = (tensor.to("meta") for tensor in batch)
        with FlopCounterMode(display=False) as counter:
            loss_sum, _ = compute_loss(model(inputs), targets)
            loss_sum.backward()
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.warning("mfu left out: the model's FLOPs could not be counted on the meta device (%s)", reason)
        return None
    return counter.get_total_flops()


def peak_memory_mb(device: torch.device) -> float | None:
    """This process's peak memory so far, in MiB (None where it cannot be read: Windows' CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class Speed:
    """The cost figures of a train record, from its steps per second and mean terms per step. The FLOPs of a
    step are counted (on the first batch of the first of ``val_loaders``) only when ``cfg.peak_flops`` is set."""

    def __init__(self, cfg: Any, device: torch.device, val_loaders: Any, build_model: Callable, compute_loss: Callable):
        self.device, self.peak_flops, self.flops_per_step = device, cfg.peak_flops, None
        if cfg.peak_flops:
            first_batch = next(iter(next(iter(val_loaders.values()))))
            flops = count_flops(build_model, cfg, first_batch, compute_loss)
            self.flops_per_step = flops and flops * cfg.accum_steps  # per process: its micro-batches

    def measure(self, steps_per_second: float, terms_per_step: float) -> dict[str, float]:
        figures = {"tokens_per_s": terms_per_step * steps_per_second}
        memory = peak_memory_mb(self.device)
        if memory is not None:
            figures["peak_memory_mb"] = memory
        if self.flops_per_step and self.peak_flops:
            figures["mfu"] = self.flops_per_step * steps_per_second / self.peak_flops
        return figures
