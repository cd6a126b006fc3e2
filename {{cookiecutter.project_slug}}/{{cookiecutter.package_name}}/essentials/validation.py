"""Essential 6: validation + best checkpoint. ``evaluate`` measures; ``validate`` records and judges.

``evaluate`` is the one evaluation code path: the training loop calls it (through
``validate``, every ``eval_every`` steps and at the end), and so does
``python -m {{ cookiecutter.package_name }}.evaluate --checkpoint OUT_DIR/best.pt``, for each validation set
(``evaluate_sets``: build_datasets may return several, by name; their metrics are named
``NAME/METRIC``, e.g. ``shifted/val_loss``). ``validate`` says whether ``cfg.monitor`` improved, so
that the loop replaces ``best.pt`` (checkpoint.py).
"""

from __future__ import annotations

import itertools
import logging
import math
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..task import METRIC_GOALS, TaskConfig, compute_metrics, metric_totals
from .config import Config, ConfigError
from .precision import Precision

if TYPE_CHECKING:  # the machinery imports the essentials' config, seed and precision: names only, for types
    from ..machinery.distributed import Process
    from ..machinery.metrics import MetricsLog
    from ..machinery.state import TrainState

log = logging.getLogger(__name__)


def alone(has_batch: bool, index: int) -> str:
    """``evaluate``'s ``agreement`` in one process, without stop requests: every batch, then the end."""
    return "go" if has_batch else "end"


# no_grad, not inference_mode: a tensor that the model caches during evaluation (rotary tables,
# masks) would otherwise become an inference tensor and break the next training backward.
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: Precision,
    task: TaskConfig,
    agreement: Callable[[bool, int], str] = alone,
) -> dict[str, float] | None:
    """The task's metrics over the whole validation set: ``metric_totals`` added up over every batch
    (and every process), then ``compute_metrics`` once, read back once at the end. ``task``: the
    config's task settings (``cfg.task``), which both receive.

    ``agreement`` (``evaluation_agreement`` under the training loop) is asked before each batch: "stop" abandons
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
            verdict = agreement(batch is not None, index)
            if verdict == "stop":
                return None
            if verdict == "end":
                break
            if verdict == "empty":
                raise ConfigError(
                    "a process had no validation batch: every process's part of an iterable "
                    "validation set (loader.stream_part) needs at least one sample"
                )
            if batch is None:  # another process still has batches: the same forward again, uncounted
                with precision.autocast():
                    model(inputs)
                continue
            inputs, targets = (tensor.to(device, non_blocking=True) for tensor in batch)
            with precision.autocast():
                output = model(inputs)
            batch = {
                name: torch.as_tensor(value, device=device).to(dtype)
                for name, value in metric_totals(output, targets, task).items()
            }
            problem = problem or layout_problem(totals, batch, index)
            if not problem:
                totals = {name: totals[name] + value if totals else value for name, value in batch.items()}
    finally:
        model.train(was_training)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:  # the same totals on every rank, or every rank stops (an all-reduce of others would hang)
        problem = agree_on_layout(totals, problem, device)
    if problem:
        raise ConfigError(
            f"metric_totals (task.py) {problem}: every batch must return the same keys, each with "
            "the same shape (count per class with torch.bincount(..., minlength=...))"
        )
    if distributed:
        totals = sum_over_processes(totals)  # the whole set's totals, not a mean of the shards' metrics
    metrics = compute_metrics(totals, task)
    values = torch.stack([torch.as_tensor(value, device=device).to(dtype) for value in metrics.values()])
    return dict(zip(metrics, values.tolist(), strict=True))


def evaluate_sets(
    model: nn.Module,
    loaders: dict[str, DataLoader],
    device: torch.device,
    precision: Precision,
    task: TaskConfig,
    agreement: Callable[[bool, int], str] = alone,
) -> dict[str, float] | None:
    """``evaluate`` on each validation set, one after the other: their metrics, each named ``SET/METRIC`` (the
    one set build_datasets returned alone: ``METRIC``). None when a stop request abandoned one."""
    metrics = {}
    for name, loader in loaders.items():
        measured = evaluate(model, loader, device, precision, task, agreement)
        if measured is None:
            return None
        metrics.update({f"{name}/{metric}" if name else metric: value for metric, value in measured.items()})
    return metrics


def check_monitor(cfg: Config, loaders: dict[str, DataLoader]) -> None:
    """``cfg.monitor`` names one of the validation sets' metrics (checked before anything is trained)."""
    names = [name for name in loaders if name]
    if names and "/" not in cfg.monitor:
        raise ConfigError(
            f"monitor '{cfg.monitor}': build_datasets returned validation sets by name ({', '.join(names)}); "
            f"say whose, e.g. monitor={names[0]}/{cfg.monitor}"
        )
    if cfg.monitor.rpartition("/")[0] not in loaders:
        raise ConfigError(
            f"monitor '{cfg.monitor}' names a validation set build_datasets did not return; it returned "
            f"{', '.join(names) or 'one set, without a name (monitor names its metric alone)'}"
        )


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


def monitor_goal(cfg: Config) -> str:
    """``min`` or ``max``: which way ``cfg.monitor`` (``METRIC``, or ``SET/METRIC``) improves, as task.py declares
    (checked before writing)."""
    metric = cfg.monitor.rpartition("/")[2]
    if metric not in METRIC_GOALS:
        raise ConfigError(f"monitor '{cfg.monitor}' is not a metric of task.py; choose one of {sorted(METRIC_GOALS)}")
    goal = METRIC_GOALS[metric]
    if goal not in ("min", "max"):
        raise ConfigError(f"METRIC_GOALS in task.py says {goal!r} for {metric}: it must be 'min' or 'max'")
    return goal


def is_better(value: float, best: float | None, goal: str) -> bool:
    if best is None:
        return math.isfinite(value)
    return value < best if goal == "min" else value > best


def validate(
    state: TrainState,
    val_loaders: dict[str, DataLoader],
    process: Process,
    precision: Precision,
    metrics_log: MetricsLog,
    agreement: Callable[[bool, int], str],
) -> bool | None:
    """Evaluate each validation set, record, and say whether ``best.pt`` is due (``cfg.monitor`` improved).

    ``agreement``: ``evaluation_agreement``. None: a stop request abandoned the evaluation (see ``evaluate``);
    the run saves and stops, and its resumption evaluates this step first.
    """
    with state.ema.swapped_in():  # ema_decay: the weights' average is what is measured
        metrics = evaluate_sets(state.model, val_loaders, process.device, precision, state.cfg.task, agreement)
    state.eval_due = metrics is None
    if metrics is None:
        return None
    monitor = state.cfg.monitor
    state.metrics = metrics
    if monitor not in metrics:
        raise ConfigError(f"task.py declares '{monitor}' but evaluation measured only {sorted(metrics)}")
    new_best = is_better(metrics[monitor], state.best_metric, monitor_goal(state.cfg))
    metrics_log.write({"step": state.step, **metrics}, group="val")
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    log.info("eval step %d  %s%s", state.step, shown, "  (new best)" if new_best else "")
    if new_best and state.step_log.bad_streak == 0:  # never the weights of a bad step
        state.best_metric, state.best_step, state.evals_since_best = metrics[monitor], state.step, 0
        return True
    state.evals_since_best += 1
    return False
