"""Essential 6 (the measuring half): validation, and evaluating a saved checkpoint.

``evaluate`` is the one evaluation code path: the training loop calls it, and
so does ``python -m {{ cookiecutter.package_name }}.evaluate --checkpoint OUT_DIR/best.pt``,
which rebuilds the model and data from the checkpoint's own config and
reproduces the metrics recorded when it was saved.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import CheckpointError, load_checkpoint, load_weights
from .config import ConfigError, apply_overrides, config_from_dict, parse_overrides, validate
from .data import build_datasets
from .distributed import Dist
from .loader import build_loaders
from .model import build_model
from .precision import Precision, resolve_device, resolve_precision
from .signals import StopRequest
from .task import TaskConfig, compute_metrics, metric_totals

log = logging.getLogger(__name__)


def evaluation_agreement(ctx: Dist, stop: StopRequest | None = None) -> Callable[[bool, int], str]:
    """For ``evaluate``, asked before each batch with whether this process has one (and the batch's index): "stop"
    when a stop request (``stop``) abandons the evaluation, "end" when no process has a batch left, "empty" when a
    process had none from the start (a part of an iterable validation set may be), else "go". Under torchrun every
    rank gets the same answer, from one host-side all-reduce a batch."""

    def go_on(has_batch: bool, index: int) -> str:
        reason = stop.reason() if stop is not None else 0
        reason, anyone, someone_without = ctx.agree_max_each([reason, has_batch, not has_batch])
        if reason:
            return "stop"
        if not anyone:
            return "end"
        return "empty" if index == 0 and someone_without else "go"

    return go_on


def alone(has_batch: bool, index: int) -> str:
    """``evaluate``'s ``go_on`` in one process, without stop requests: every batch, then the end."""
    return "go" if has_batch else "end"


# no_grad, not inference_mode: a tensor that the model caches during evaluation (rotary tables,
# masks) would otherwise become an inference tensor and break the next training backward.
@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, precision: Precision, task: TaskConfig,
    go_on: Callable[[bool, int], str] = alone,
) -> dict[str, float] | None:  # fmt: skip
    """The task's metrics over the whole validation set: ``metric_totals`` added up over every batch
    (and every process), then ``compute_metrics`` once, read back once at the end. ``task``: the
    config's task settings (``cfg.task``), which both receive.

    ``go_on`` (``evaluation_agreement`` under the training loop) is asked before each batch: "stop" abandons
    the evaluation (returns None), so that a preempted job saves at once instead of after a long evaluation.
    Under torchrun the processes go on together until none has a batch left: one whose part is shorter repeats
    its last batch meanwhile, uncounted, as DDP may broadcast buffers and FSDP gathers each unit's weights from
    every rank, in each forward.
    """
    was_training = model.training
    model.eval()
    # Running totals on the device, in float64 (MPS has none: float32 there).
    dtype = torch.float32 if device.type == "mps" else torch.float64
    totals: dict[str, torch.Tensor] = {}
    problem = ""  # a batch whose totals do not add up with the others' (task.py); found, the rest go on
    batches, inputs = iter(loader), None
    try:
        for index in itertools.count():
            batch = next(batches, None)
            verdict = go_on(batch is not None, index)
            if verdict == "stop":
                return None
            if verdict == "end":
                break
            if verdict == "empty":
                raise ConfigError("a process had no validation batch: every process's part of an iterable "
                                  "validation set (loader.stream_part) needs at least one sample")  # fmt: skip
            if batch is None:  # another process still has batches: the same forward again, uncounted
                with precision.autocast():
                    model(inputs)
                continue
            inputs, targets = (tensor.to(device, non_blocking=True) for tensor in batch)
            with precision.autocast():
                output = model(inputs)
            batch = {name: torch.as_tensor(value, device=device).to(dtype)
                     for name, value in metric_totals(output, targets, task).items()}  # fmt: skip
            problem = problem or layout_problem(totals, batch, index)
            if not problem:
                totals = {name: totals[name] + value if totals else value for name, value in batch.items()}
    finally:
        model.train(was_training)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:  # the same totals on every rank, or every rank stops (an all-reduce of others would hang)
        problem = agree_on_layout(totals, problem, device)
    if problem:
        raise ConfigError(f"metric_totals (task.py) {problem}: every batch must return the same keys, each with "
                          "the same shape (count per class with torch.bincount(..., minlength=...))")  # fmt: skip
    if distributed:
        totals = sum_over_processes(totals)  # the whole set's totals, not a mean of the shards' metrics
    metrics = compute_metrics(totals, task)
    values = torch.stack([torch.as_tensor(value, device=device).to(dtype) for value in metrics.values()])
    return dict(zip(metrics, values.tolist(), strict=True))


def layout_problem(totals: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], index: int) -> str:
    """What differs between a batch's totals and those added up so far ("" when nothing does, or at first)."""
    seen, new = ({name: tuple(value.shape) for name, value in d.items()} for d in (totals, batch))
    return f"returned {new} for batch {index} but {seen} before" if totals and seen != new else ""


def agree_on_layout(totals: dict[str, torch.Tensor], problem: str, device: torch.device) -> str:
    """Under torchrun, every rank calls it: this rank's problem, or one every rank sees when a rank had one
    or when the ranks' totals differ in names or shapes ("" when none). One all-reduce (MAX) of 3 numbers:
    whether this rank had a problem, the signature of its layout, and its negative (for the minimum)."""
    layout = repr(sorted((name, tuple(value.shape)) for name, value in totals.items()))
    signature = zlib.crc32(layout.encode())
    flags = torch.tensor([int(bool(problem)), signature, -signature], device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    any_problem, largest, negated_smallest = flags.tolist()
    if problem or any_problem:
        return problem or "failed on another process; its message says which batch"
    if largest != -negated_smallest:
        return f"returned {layout} here and other names or shapes on another process"
    return ""


def sum_over_processes(totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each total (of any shape) summed over every torchrun process, in one all-reduce."""
    flat = torch.cat([value.reshape(-1) for value in totals.values()])
    torch.distributed.all_reduce(flat)
    pieces = flat.split([value.numel() for value in totals.values()])
    return {name: piece.view_as(value) for (name, value), piece in zip(totals.items(), pieces, strict=True)}


def evaluate_checkpoint(path: str | Path, overrides: list[str] | None = None) -> dict[str, float]:
    return evaluate_state(load_checkpoint(path), path, overrides)


def evaluate_state(state: dict, path: str | Path, overrides: list[str] | None = None) -> dict[str, float]:
    """Rebuild model and data from a loaded checkpoint's config (plus overrides) and evaluate it."""
    cfg = config_from_dict(state["config"], source=str(path))
    apply_overrides(cfg, parse_overrides(overrides or []))
    validate(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model = build_model(cfg)
    load_weights(model, state, path)  # a file, or parallel=fsdp's sharded last, read whole into this process
    model.to(device)
    train_set, val_set = build_datasets(cfg)
    _, val_loader = build_loaders(cfg, train_set, val_set, Dist(device=device))
    return evaluate(model, val_loader, device, precision, cfg.task)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m {{ cookiecutter.package_name }}.evaluate",
        description="Evaluate a saved checkpoint on the validation set with the checkpoint's own config.",
    )
    parser.add_argument("--checkpoint", required=True, help="path to best.pt or last.pt")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config changes, e.g. device=cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        state = load_checkpoint(args.checkpoint)
        metrics = evaluate_state(state, args.checkpoint, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # the same status as train's for a checkpoint it cannot use
        print(f"error: {e}", file=sys.stderr)
        return 1
    recorded = state.get("metrics") or {}
    for name, value in metrics.items():
        saved = f"  (recorded at save: {recorded[name]:.6f})" if name in recorded else ""
        print(f"{name}: {value:.6f}{saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
