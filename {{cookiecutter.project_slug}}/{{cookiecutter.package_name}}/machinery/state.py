"""The state of a run: everything a checkpoint holds, in one object.

``TrainState`` holds the model, optimizer, schedule, GradScaler and data
position, with the loop's own counters, behind ``state_dict()`` and
``load_state_dict()``: the Stateful protocol of torch.distributed.checkpoint,
which torchtitan follows too. checkpoint.py saves that one dict, whole in a
file or sharded (``parallel=fsdp``), and puts it back.

``StepLog`` is the loop's bookkeeping of its steps: each step's loss sum,
count of terms and gradient norm stay on the device until a log, evaluation or
save step reads them all at once, and it keeps the totals its next log record
is made of.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ..essentials.config import Config, to_dict
from ..essentials.ema import WeightEMA
from ..essentials.schedule import Schedule
from .loader import BatchStream

log = logging.getLogger(__name__)

# The model and optimizer gathered whole on rank 0 in CPU memory, whether the model is plain, DDP, compiled or FSDP.
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)
# How the optimizer runs on this device, not what it has learned: never taken from a checkpoint.
OPTIMIZER_FLAGS = ("fused", "foreach", "capturable")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite steps); exit code 1."""


class StepLog:
    """Step bookkeeping: the steps' values on the device until read, then the totals of the next log record."""

    SAVED = ("clean_steps", "loss_total", "grad_norm_total", "skipped", "skipped_total", "bad_streak", "terms", "steps")

    def __init__(self) -> None:
        self.unread: list[tuple[torch.Tensor, ...]] = []  # (loss sum, count, grad norm) of the steps not read yet
        self.lr = 0.0  # the learning rate of the last step
        self.clean_steps = 0  # since the last log record: steps with a finite loss and gradients,
        self.loss_total = 0.0  # their losses added up,
        self.grad_norm_total = 0.0  # and their gradient norms;
        self.skipped = 0  # steps skipped for non-finite gradients
        self.skipped_total = 0  # the same, over the whole run
        self.bad_streak = 0  # consecutive steps with a non-finite loss or gradient
        self.terms, self.steps = 0.0, 0  # since the last log record: loss terms (tokens...) and steps, for tokens_per_s
        self.terms_per_step = 0.0  # their mean, at the last log record

    def add(self, loss_sum: torch.Tensor, count: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        """A step's summed loss, its count of terms and its gradient norm, tensors left where they are."""
        self.unread.append((loss_sum, count, grad_norm))
        self.lr = lr

    def read(self, last_step: int, fp16: bool, max_bad_steps: int) -> None:
        """Read every step since the last read (one host sync) into the totals; stop after max_bad_steps bad ones.

        A step was skipped when its gradient norm is not finite. It is bad when its loss is not finite, or its
        gradients are not, except with fp16, where the GradScaler overflows on purpose now and then to find its
        scale (it then lowers the scale). A NaN on any rank reaches every rank's loss (summed over ranks) and
        gradients (all-reduced), so every rank counts the same.
        """
        rows = []
        if self.unread:
            sums, counts, norms = (torch.stack(column) for column in zip(*self.unread, strict=True))
            rows = torch.stack((sums / counts, norms, counts), dim=1).double().tolist()  # mean loss, norm, terms
        self.unread.clear()
        bad_steps = []
        for step, (loss, grad_norm, terms) in enumerate(rows, start=last_step - len(rows) + 1):
            self.terms, self.steps = self.terms + terms, self.steps + 1
            skipped = not math.isfinite(grad_norm)
            bad = not math.isfinite(loss) or (skipped and not fp16)
            self.skipped += skipped
            self.skipped_total += skipped
            if not (skipped or bad):
                self.clean_steps, self.loss_total, self.grad_norm_total = (
                    self.clean_steps + 1,
                    self.loss_total + loss,
                    self.grad_norm_total + grad_norm,
                )
            self.bad_streak = self.bad_streak + 1 if bad else 0
            bad_steps += [step] if bad else []
            if self.bad_streak >= max_bad_steps:
                raise TrainingError(
                    f"{self.bad_streak} consecutive steps with a non-finite loss or gradient (last at step "
                    f"{step}); stopping. best.pt and last.pt hold the state from before them"
                )
        if bad_steps:
            log.warning("non-finite loss or gradients at step(s) %s", bad_steps)

    def record(self, step: int) -> dict[str, Any]:
        """The log record of the steps since the last one: the mean loss and gradient norm of the clean ones."""
        record: dict[str, Any] = {"step": step, "lr": self.lr, "skipped": self.skipped}
        if self.clean_steps:
            record["loss"] = self.loss_total / self.clean_steps
            record["grad_norm"] = self.grad_norm_total / self.clean_steps
        self.terms_per_step = self.terms / max(self.steps, 1)
        self.clean_steps, self.loss_total, self.grad_norm_total, self.skipped = 0, 0.0, 0.0, 0
        self.terms, self.steps = 0.0, 0
        return record

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.SAVED}  # read first: nothing on the device

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for name in self.SAVED:
            setattr(self, name, saved.get(name, 0))  # terms and steps: absent from older checkpoints


@dataclass
class TrainState:
    """The state of a run: what a checkpoint holds, and the config it was trained with."""

    cfg: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    scaler: torch.amp.GradScaler  # fp16's; a disabled one (no state) for bf16 and fp32
    batches: BatchStream  # the training data, and the position in it
    ema: WeightEMA  # the weights' moving average (ema_decay; empty when off)
    step: int = 0  # optimizer steps taken (skipped ones included)
    best_metric: float | None = None  # the best value of cfg.monitor so far
    best_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation
    evals_since_best: int = 0  # evaluations since monitor last improved (early stopping, cfg.patience)
    eval_due: bool = False  # a stop request cut this step's evaluation short: a resumed run does it first
    tracker_run_id: str = ""  # the W&B or MLflow run this run logs to (cfg.tracker), continued on resume
    step_log: StepLog = field(default_factory=StepLog)

    COUNTERS = ("step", "best_metric", "best_step", "metrics", "evals_since_best", "eval_due", "tracker_run_id")

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # what is clipped (FSDP: the shards)

    def state_dict(self, whole: bool = True, with_optimizer: bool = True) -> dict[str, Any]:
        """Everything needed to continue exactly. ``whole``: the model and optimizer gathered whole (every rank
        must call it; under FSDP rank 0 alone gets them); otherwise this process's own part (FSDP: its shards).
        Without the optimizer's state, the weights and the rest, for evaluation and init_from only."""
        options = WHOLE if whole else None
        if with_optimizer:
            model, optimizer = get_state_dict(self.model, self.optimizer, options=options)
            parts = {"model": model, "optimizer": optimizer}  # by parameter name
            if self.ema.average:
                parts["ema"] = self.ema.state_dict(whole)
        else:
            parts = {"model": get_model_state_dict(self.model, options=options)}
        return {
            "config": to_dict(self.cfg),
            **parts,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),  # {} unless fp16
            "data": self.batches.state_dict(),
            **{name: getattr(self, name) for name in self.COUNTERS},
            "step_log": self.step_log.state_dict(),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Put a saved state back, its model and optimizer whole or this process's shards. The config stays this
        run's own (the run folder reports how it differs from the saved one)."""
        optimizer = {**saved["optimizer"], "param_groups": keep_flags(saved["optimizer"], self.optimizer)}
        # full_state_dict: whole tensors are cut into this process's shards (FSDP); shards (DTensors) go as they are.
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=saved["model"],
            optim_state_dict=optimizer,
            options=StateDictOptions(full_state_dict=True),
        )
        self.ema.load_state_dict(saved.get("ema"))  # none saved: the average starts from the weights
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved["scaler"]:  # empty when saved without fp16: the new GradScaler starts fresh
            self.scaler.load_state_dict(saved["scaler"])
        self.batches.load_state_dict(saved["data"])
        for name in self.COUNTERS:
            setattr(self, name, saved[name])
        self.step_log.load_state_dict(saved["step_log"])


def keep_flags(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The saved param groups with this optimizer's kernel flags: restoring the saving machine's would switch a
    fused AdamW to foreach (or back), and place its state as the other kernel expects."""
    groups = [
        {**saved_group, **{flag: group[flag] for flag in OPTIMIZER_FLAGS if flag in group}}
        for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=False)
    ]  # a different number of groups is reported by the loading
    return groups + saved["param_groups"][len(groups) :]
