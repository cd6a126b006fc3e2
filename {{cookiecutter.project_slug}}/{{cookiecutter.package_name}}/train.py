"""The training loop: read it top to bottom in ``run()``.

    python -m {{ cookiecutter.package_name }}.train --config configs/default.yaml [key=value ...]
{%- if cookiecutter.loop == "accelerate" %}
    accelerate launch --num_processes=N -m {{ cookiecutter.package_name }}.train --config ...   (or torchrun)

Written with Hugging Face Accelerate: ``Accelerator`` picks the device, joins the
processes, wraps the model in DDP, autocasts its forward and scales fp16 losses;
the loop keeps the rest (the step's exact mean, the guard, checkpoints, resume).
{%- endif %}

The essentials each live in a file named after them: config.py, seed.py,
precision.py, schedule.py, checkpoint.py (+ evaluate.py for validation).
Yours to replace: data.py, model.py, task.py (loss and metric).

Exit status: 0 done; 1 training failed (non-finite steps, a checkpoint that
cannot be read or written); 2 bad input (config, command line); 128 + signal
when stopped by SIGTERM (143) or SIGINT (130) after writing last.pt; 124 when
max_time_minutes ran out, after writing last.pt.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
{%- if cookiecutter.loop == "accelerate" %}
from datetime import timedelta
{%- endif %}
from pathlib import Path
from typing import Any

import torch
{%- if cookiecutter.loop == "accelerate" %}
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs
{%- endif %}
from torch import nn
{%- if cookiecutter.loop == "plain" %}
from torch.distributed.tensor import DTensor
{%- endif %}
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from . import distributed
from .checkpoint import (
    CheckpointError,
    RunState,
    load_model_state,
    load_resume_checkpoint,
    load_weights,
    remove,
    restore_training,
    save_training,
)
from .config import Config, ConfigError, differences, dump_yaml, load_config, lr_multipliers, to_dict
from .data import build_datasets
from .evaluate import evaluate
from .loader import build_loaders
from .metrics import MetricsLog, require_tensorboard
{%- if cookiecutter.loop == "plain" %}
from .model import build_model, fsdp_units
from .precision import Precision, allow_tf32, resolve_precision
{%- else %}
from .model import build_model
from .precision import Precision, allow_tf32, resolve_device, resolve_precision
{%- endif %}
from .progress import Progress, describe_run, summarize
from .schedule import build_scheduler, decay_horizon
from .seed import seed_everything
from .signals import TIME_LIMIT, StopRequest, exit_status
from .task import METRIC_GOALS, compute_loss
from .trackers import TrackerError, require_tracker, start_tracker

log = logging.getLogger(__name__)

RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "last", "best.pt")  # last: parallel=fsdp's, a folder
# Written when a signal or max_time_minutes stopped the run (after last.pt), removed when it starts again:
# torchrun exits 1 when its processes exit 143 or 124, so a requeue script looks for this file (README,
# Resuming and preemption).
STOPPED_MARKER = "stopped_by_signal"
# Changing these on resume is harmless; any other difference is reported as one
# that makes the resumed run differ from an uninterrupted one.
SAFE_ON_RESUME = {
    *("eval_every", "log_every", "ckpt_every", "out_dir", "num_workers", "num_threads", "device"),
    *("max_bad_steps", "dist_timeout_minutes", "progress", "tensorboard", "compile", "tf32", "max_time_minutes"),
}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite steps); exit code 1."""


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum (``cfg.optimizer``), one param group per lr factor and weight decay."""
    # Weight decay on weight matrices and embeddings only: decaying biases and norm gains towards zero only
    # hurts. lr_multipliers: parameters whose names start with a prefix get their own lr (the schedule keeps
    # the ratio); the first two groups hold the others, with and without decay.
    multipliers = lr_multipliers(cfg.lr_multipliers)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            factor = next((f for prefix, f in multipliers if name.startswith(prefix)), 1.0)
            groups.setdefault((factor, p.ndim >= 2), []).append(p)
    param_groups = [
        {"params": params, "lr": cfg.lr * factor, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (factor, decay), params in groups.items()
    ]
    # The fused kernels are the fastest, and they can skip a step on the device (optimizer_step), so no
    # step needs a host sync. torch has them for CUDA, MPS and the CPU.
    fused = device.type in ("cuda", "mps", "cpu") or None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def gradients_by_device(params: list[nn.Parameter]) -> dict[torch.device, list[torch.Tensor]]:
    """The parameters' gradients, grouped by device (a model may span several); those without one left out."""
    grads_on: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            grads_on.setdefault(p.grad.device, []).append(p.grad)
    return grads_on


def divide_gradients(params: list[nn.Parameter], divisor: torch.Tensor) -> None:
    """Divide every gradient by ``divisor``, a tensor (no host sync)."""
    for device, grads in gradients_by_device(params).items():
        torch._foreach_div_(grads, divisor.to(device))


{%- if cookiecutter.loop == "plain" %}


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Essential 4: scale the gradients so their total norm is at most ``max_norm`` (0: leave them alone).

    Returns the norm before clipping, as a tensor (no host sync). Call it after
    ``scaler.unscale_``, so that it sees the true gradients. The arithmetic of
    ``torch.nn.utils.clip_grad_norm_`` (a test compares them) at half its cost on a
    small model: it regroups the gradients twice per call. Parameters without a
    gradient are left out; a model spread over several devices works.
    """
    grads_on = gradients_by_device(params)
    if not grads_on:
        return torch.zeros(())
    first = next(iter(grads_on))
    norms = [norm.to(first) for grads in grads_on.values() for norm in torch._foreach_norm(grads)]
    total = torch.linalg.vector_norm(torch.stack(norms))
    if isinstance(total, DTensor):  # FSDP's sharded gradients: the norm is reduced over ranks, the same on each
        total = total.to_local()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for device, grads in grads_on.items():
            torch._foreach_mul_(grads, scale.to(device))
    return total


def optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()``, unless ``skip`` (a float32 0/1 tensor) is 1: decided on the device where possible."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        # Fused optimizers take GradScaler's found_inf flag and skip on the device; the
        # gradients are already unscaled (grad_scale None). GradScaler.step(optimizer) does
        # the same for fp16 only: this works for every precision.
        optimizer.grad_scale, optimizer.found_inf = None, skip
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not skip.item():  # any other optimizer: one host read per step, as GradScaler.step makes for it
        optimizer.step()
{%- endif %}


class StepValues:
    """Each step's loss and gradient norm, kept on the device until a log, eval or save step reads them."""

    def __init__(self) -> None:
        self.pending: list[torch.Tensor] = []

    def add(self, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.pending.append(torch.stack((step_loss, grad_norm)))

    def read(self) -> list[list[float]]:
        """One host sync for every step since the last read (the values are the same on every rank)."""
        if not self.pending:
            return []
        rows = torch.stack(self.pending).float()
        self.pending.clear()
        return rows.tolist()


def take_step_values(run: RunState, rows: list[list[float]], fp16: bool, cfg: Config) -> None:
    """Add the steps read from the device to ``run``; stop after ``max_bad_steps`` bad steps in a row.

    A step was skipped when its gradient norm is not finite (see the loop). It is bad when its loss is
    not finite, or its gradients are not, except with fp16, where the GradScaler overflows on purpose
    now and then to find its scale (it then lowers the scale). A NaN on any rank reaches every rank's
    loss (summed over ranks) and gradients (all-reduced), so every rank counts the same.
    """
    bad_steps = []
    for step, (loss, grad_norm) in enumerate(rows, start=run.step - len(rows) + 1):
        skipped = not math.isfinite(grad_norm)
        bad = not math.isfinite(loss) or (skipped and not fp16)
        run.unlogged.append([step, loss, grad_norm, float(skipped), float(bad)])
        run.skipped_total += skipped
        run.bad_streak = run.bad_streak + 1 if bad else 0
        if bad:
            bad_steps.append(step)
        if run.bad_streak >= cfg.max_bad_steps:
            raise TrainingError(
                f"{run.bad_streak} consecutive steps with a non-finite loss or gradient (last at step "
                f"{step}); stopping. best.pt and last.pt hold the state from before them"
            )
    if bad_steps:
        log.warning("non-finite loss or gradients at step(s) %s", bad_steps)


def train_record(run: RunState, lr: float) -> dict[str, Any]:
    """The log record of the steps since the last one: mean loss and grad norm over the clean steps."""
    clean = [row for row in run.unlogged if not (row[3] or row[4])]
    record = {"step": run.step, "lr": lr, "skipped": sum(int(row[3]) for row in run.unlogged)}
    if clean:
        record["loss"] = sum(row[1] for row in clean) / len(clean)
        record["grad_norm"] = sum(row[2] for row in clean) / len(clean)
    run.unlogged.clear()
    return record


def monitor_goal(cfg: Config) -> str:
    """``min`` or ``max``: which way ``cfg.monitor`` improves, as task.py declares (checked before writing)."""
    if cfg.monitor not in METRIC_GOALS:
        raise ConfigError(f"monitor '{cfg.monitor}' is not a metric of task.py; choose one of {sorted(METRIC_GOALS)}")
    goal = METRIC_GOALS[cfg.monitor]
    if goal not in ("min", "max"):
        raise ConfigError(f"METRIC_GOALS in task.py says {goal!r} for {cfg.monitor}: it must be 'min' or 'max'")
    if cfg.monitor_mode not in ("auto", goal):
        raise ConfigError(
            f"monitor_mode={cfg.monitor_mode} contradicts task.py, where {cfg.monitor} is better when "
            f"{'lower' if goal == 'min' else 'higher'}: use monitor_mode=auto (or fix METRIC_GOALS)"
        )
    return goal


def is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return math.isfinite(value)
    return value < best if mode == "min" else value > best


def validate(
    model: nn.Module, val_loader: DataLoader, device: torch.device, precision: Precision, cfg: Config, run: RunState,
    metrics_log: MetricsLog, stop: Callable[[int], bool] | None = None,
) -> bool | None:  # fmt: skip
    """Essential 6: evaluate, record, and say whether ``best.pt`` is due (``cfg.monitor`` improved).

    None: a stop request abandoned the evaluation (see ``evaluate``); the run saves and stops, and
    its resumption evaluates this step first.
    """
    metrics = evaluate(model, val_loader, device, precision, stop)
    run.eval_due = metrics is None
    if metrics is None:
        return None
    run.metrics = metrics
    if cfg.monitor not in run.metrics:
        raise ConfigError(f"task.py declares '{cfg.monitor}' but evaluation measured only {sorted(run.metrics)}")
    new_best = is_better(run.metrics[cfg.monitor], run.best_metric, monitor_goal(cfg))
    metrics_log.write({"step": run.step, **run.metrics}, group="val")
    shown = "  ".join(f"{k} {v:.4f}" for k, v in run.metrics.items())
    log.info("eval step %d  %s%s", run.step, shown, "  (new best)" if new_best else "")
    if new_best and run.bad_streak == 0:  # never the weights of a bad step
        run.best_metric, run.best_step, run.evals_since_best = run.metrics[cfg.monitor], run.step, 0
        return True
    run.evals_since_best += 1
    return False


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile where this platform can; otherwise say why and train uncompiled."""
    import torch._dynamo  # already loaded by torch.optim; named here for is_dynamo_supported

    reason = None
    if not torch._dynamo.is_dynamo_supported():
        reason = f"torch.compile does not support Python {sys.version.split()[0]} on {sys.platform} yet"
    elif device.type == "cpu" and not any(shutil.which(cc) for cc in (os.environ.get("CXX"), "g++", "clang++") if cc):
        reason = "compiling for the CPU needs a C++ compiler (install g++ or clang++, or set CXX)"
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        reason = "compiling for CUDA needs Triton (pip install triton, or the CUDA build of PyTorch that ships it)"
    if reason:
        log.warning("compile=true skipped: %s; training uncompiled", reason)
        return model
    return torch.compile(model)


def evaluation_stopper(
    stop: StopRequest, ctx: distributed.Dist, val_size: int, batch_size: int
) -> Callable[[int], bool]:
    """For ``evaluate``: before each batch, whether a stop request abandons the evaluation.

    Under torchrun the ranks agree on it, before each of the batches that every rank's shard has.
    """
    shared_batches = math.ceil(val_size // ctx.world_size / batch_size)
    return lambda batch: batch < shared_batches and ctx.agree_max(stop.reason()) > 0


def resume_checkpoint_path(cfg: Config) -> Path | None:
    if cfg.resume == "":
        return None
    if cfg.resume == "auto":  # last.pt, or parallel=fsdp's sharded last (only one of them is kept)
        found = [Path(cfg.out_dir) / name for name in ("last.pt", "last") if (Path(cfg.out_dir) / name).exists()]
        return found[0] if found else None
    path = Path(cfg.resume)
    if not path.exists():
        raise ConfigError(f"resume checkpoint {path} does not exist (use resume=auto to continue only if there is one)")
    return path


def init_from_path(cfg: Config) -> Path | None:
    if not cfg.init_from:
        return None
    path = Path(cfg.init_from)
    if not path.exists():
        raise ConfigError(f"init_from checkpoint {path} does not exist")
    return path


def check_out_dir(cfg: Config, resuming_from: Path | None) -> None:
    """Never overwrite a run by accident: a fresh start needs an empty out_dir or overwrite=true."""
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir {out_dir} exists and is not a folder")
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    continuing_here = resuming_from is not None and resuming_from.resolve().parent == out_dir.resolve()
    if existing and not continuing_here and not cfg.overwrite:
        raise ConfigError(
            f"out_dir {out_dir} already holds a run ({', '.join(existing)}): "
            "pass resume=auto to continue it, overwrite=true to replace it, or another out_dir"
        )


def report_config_changes(saved: dict[str, Any], cfg: Config, path: Path) -> None:
    changes = differences(saved, to_dict(cfg))
    for key in ("resume", "overwrite"):  # how this run was started, not what it trains
        changes.pop(key, None)
    saved_horizon = saved.get("decay_steps") or saved["max_steps"]
    for key, (old, new) in changes.items():
        note = ""
        if key in ("max_steps", "decay_steps"):  # safe unless they move the end of the lr schedule
            horizon = decay_horizon(cfg)
            if cfg.lr_schedule != "step" and horizon != saved_horizon:
                note = f"  (the lr schedule now ends at step {horizon}, not {saved_horizon}: the resumed run will "
                note += f"differ from an uninterrupted one; decay_steps={saved_horizon} keeps it)"
        elif key not in SAFE_ON_RESUME:
            note = "  (the resumed run will differ from an uninterrupted one)"
        log.warning("resume: %s changed from %r to %r%s", key, old, new, note)
    if changes:
        log.info("resume: %d config change(s) against %s", len(changes), path)


def prepare_out_dir(cfg: Config, ctx: distributed.Dist, resuming: bool, state: RunState) -> MetricsLog:
    """Rank 0 writes the run's folder (config.yaml; a fresh metrics.jsonl, or the resumed one cut at the
    checkpoint's step) and starts the tracker (continuing the checkpoint's tracker run)."""
    out_dir, step = Path(cfg.out_dir), state.step
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", enabled=ctx.is_main)
    error = None
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            for name in RUN_FILES:  # only reached with overwrite=true, or an empty folder
                remove(out_dir / name)
            for folder in ("tensorboard", "wandb"):
                shutil.rmtree(out_dir / folder, ignore_errors=True)
        (out_dir / STOPPED_MARKER).unlink(missing_ok=True)
        if cfg.tensorboard:
            metrics_log.add_tensorboard(out_dir / "tensorboard", first_step=step)
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
        if resuming:
            metrics_log.truncate_after(step)
        if cfg.tracker != "none":
            try:
                metrics_log.tracker = start_tracker(cfg, state.tracker_run_id, out_dir)
                state.tracker_run_id = metrics_log.tracker.run_id
            except TrackerError as e:
                error = e
    # The other ranks only read what rank 0 wrote; they stop with it when its tracker could not start.
    if ctx.agree_max(error is not None):
        raise error or TrackerError("rank 0 could not start the tracker; its message says why")
    return metrics_log


def announce_stop(cfg: Config, ctx: distributed.Dist, state: RunState, stop_reason: int) -> None:
    """Say why the run ends before max_steps; after a signal or the time limit, also leave the marker a
    requeue script reads."""
    if not stop_reason:
        log.warning("early stop at step %d: %d evaluations without a better %s (patience=%d)",
                    state.step, state.evals_since_best, cfg.monitor, cfg.patience)  # fmt: skip
        return
    if stop_reason == TIME_LIMIT:
        why = f"time limit (max_time_minutes={cfg.max_time_minutes:g})"
    else:
        why = f"signal {stop_reason}"
    if ctx.is_main:
        (Path(cfg.out_dir) / STOPPED_MARKER).write_text(f"{why} at step {state.step}\n")
    log.warning("stopped by %s at step %d; last.pt saved, resume with resume=auto", why, state.step)


def finish(
    cfg: Config, state: RunState, seconds: float, train_seconds: float, samples: int, stop_reason: int
) -> dict[str, Any]:
    """The run's summary: printed (the end block) and returned."""
    summary = {
        "step": state.step,
        "seconds": seconds,
        "train_seconds": train_seconds,
        "best_metric": state.best_metric,
        "best_step": state.best_step,
        "metrics": state.metrics,
        "skipped_steps": state.skipped_total,
        "stopped_by_signal": stop_reason if stop_reason not in (0, TIME_LIMIT) else None,
        "time_limit_reached": stop_reason == TIME_LIMIT,
        "exit_code": exit_status(stop_reason),
        "out_dir": str(Path(cfg.out_dir)),
        "monitor": cfg.monitor,
        "samples_per_second": samples / max(train_seconds, 1e-9),
    }
    summarize(summary, Path(cfg.out_dir))
    return summary


{%- if cookiecutter.loop == "plain" %}


def train(cfg: Config) -> dict[str, Any]:
    """Train as ``cfg`` says; return a summary. Raises ConfigError, CheckpointError or TrainingError."""
    ctx, device = distributed.setup(cfg.device, cfg.dist_timeout_minutes)
    try:
        summary = run(cfg, ctx, device)
    except BaseException:
        distributed.cleanup(ctx, wait_for_others=False)
        raise
    distributed.cleanup(ctx)
    return summary


def run(cfg: Config, ctx: distributed.Dist, device: torch.device) -> dict[str, Any]:
    started = time.perf_counter()
    # --- set-up: everything is checked before any file is written ---
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    precision = resolve_precision(cfg.precision, device)
    monitor_goal(cfg)
{%- else %}


def start_accelerator(cfg: Config) -> tuple[Accelerator, Precision]:
    """The Accelerator for this config: its device, its processes (accelerate launch or torchrun), its precision."""
    if cfg.parallel != "ddp":
        raise ConfigError("parallel=fsdp is not in this project's Accelerate loop, which runs DDP: use parallel=ddp")
    if cfg.device.startswith("cuda:"):
        raise ConfigError(
            f"device '{cfg.device}': Accelerate gives each process its GPU; use device=cuda (or auto) "
            "and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    device = resolve_device(cfg.device)  # one that exists here, as the plain loop checks it
    precision = resolve_precision(cfg.precision, device)
    if precision.name == "fp16" and device.type == "cpu":
        log.warning("precision fp16: Accelerate has no fp16 autocast on the CPU; training in fp32")
        precision = Precision("fp32", "cpu")
    accelerator = Accelerator(
        cpu=device.type == "cpu",  # also what makes torchrun's CPU processes one group (gloo)
        mixed_precision={"fp32": "no"}.get(precision.name, precision.name),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.dist_timeout_minutes))],
    )
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise ConfigError(
            f"Accelerate is configured for {accelerator.distributed_type.value}; this loop runs one process or "
            "DDP: run `accelerate config` again without FSDP or DeepSpeed"
        )
    return accelerator, precision


def train(cfg: Config) -> dict[str, Any]:
    """Train as ``cfg`` says; return a summary. Raises ConfigError, CheckpointError or TrainingError."""
    try:
        accelerator, precision = start_accelerator(cfg)
        ctx = distributed.joined(cfg.dist_timeout_minutes)  # the group Accelerate joined, for the ranks' agreement
        try:
            summary = run(cfg, accelerator, ctx, precision)
        except BaseException:
            distributed.cleanup(ctx, wait_for_others=False)
            raise
        distributed.cleanup(ctx)
    finally:
        # Accelerate keeps its state in the process: let a next train() here choose another precision.
        AcceleratorState._reset_state(reset_partial_state=True)
    return summary


def run(cfg: Config, accelerator: Accelerator, ctx: distributed.Dist, precision: Precision) -> dict[str, Any]:
    started = time.perf_counter()
    device = accelerator.device
    # --- set-up: everything is checked before any file is written ---
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    monitor_goal(cfg)
{%- endif %}
    allow_tf32(device, cfg.tf32)
    if cfg.tensorboard:
        require_tensorboard()
    require_tracker(cfg)
    # Rank 0 decides whether and from where to resume (nodes may have disks of their own); every rank follows.
    resume_from = ctx.decide_on_main(lambda: resume_checkpoint_path(cfg))
    check_out_dir(cfg, resume_from)
    saved = load_resume_checkpoint(resume_from, ctx)
    # Fine-tuning (init_from): a fresh run that starts from another run's weights; a resumed run ignores it.
    weights_from = ctx.decide_on_main(lambda: init_from_path(cfg) if saved is None else None)
    initial = load_resume_checkpoint(weights_from, ctx)

    train_set, val_set = build_datasets(cfg)
    model = build_model(cfg)  # the same initial weights on every rank: same seed
    if saved is not None and "sharded" not in saved:  # a sharded checkpoint loads into the sharded model, below
        load_model_state(model, saved["model"], resume_from)
    if initial is not None:
        load_weights(model, initial, weights_from)
    model.to(device)
{%- if cookiecutter.loop == "plain" %}
    # Under torchrun: DDP, or FSDP (parallel=fsdp) sharding fsdp_units (model.py); then the optimizer.
    model = distributed.parallelize(model, cfg.parallel, ctx, device, precision, fsdp_units)
    params = [p for p in model.parameters() if p.requires_grad]  # what clipping looks at (FSDP: the shards)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg)
    # A GradScaler for fp16 (agreeing on overflows across FSDP's shards); for bf16 and fp32 one that does nothing.
    scaler = precision.make_scaler(sharded=ctx.enabled and cfg.parallel == "fsdp")
{%- else %}
    # Accelerate: DDP under several processes, autocast around the forward, fp16's GradScaler in the step.
    model, optimizer = accelerator.prepare(model, build_optimizer(model, cfg, device))
    params = [p for p in model.parameters() if p.requires_grad]
    # Not prepared: a torch LR scheduler prepared by Accelerate steps num_processes times per optimizer
    # step (it counts batches per process); this schedule counts optimizer steps, on any number of processes.
    scheduler = build_scheduler(optimizer, cfg)
    # Accelerate's GradScaler for fp16 on a GPU; otherwise one that does nothing (checkpoints hold its state).
    scaler = accelerator.scaler or torch.amp.GradScaler(device.type, enabled=False)
{%- endif %}
    batches, val_loader = build_loaders(cfg, train_set, val_set, device, ctx.rank, ctx.world_size)
    if ctx.enabled:
        seed_everything(cfg.seed + ctx.rank)  # each rank its own dropout/augmentation stream
    if cfg.compile:
        model = compile_model(model, device)
    state = RunState()
    if saved is not None:
        report_config_changes(saved["config"], cfg, resume_from)
        state = restore_training(saved, resume_from, cfg, ctx, model, optimizer, scheduler, scaler, batches)
    out_dir = Path(cfg.out_dir)
    metrics_log = prepare_out_dir(cfg, ctx, saved is not None, state)
    describe_run(cfg, device, precision.name, sum(p.numel() for p in params), ctx.world_size,
                 f"resumed from {resume_from} at step {state.step}" if saved is not None else "")  # fmt: skip

    def save(name: str) -> None:  # best.pt, or last.pt (with parallel=fsdp, the sharded folder last)
        save_training(out_dir / name, cfg, ctx, model, optimizer, scheduler, scaler, batches, state)

    if state.eval_due and validate(model, val_loader, device, precision, cfg, state, metrics_log):
        save("best.pt")  # the evaluation a stop request cut short, done as the uninterrupted run did
    stop = StopRequest(deadline=started + 60 * cfg.max_time_minutes if cfg.max_time_minutes else None)
    stop_evaluation = evaluation_stopper(stop, ctx, len(val_set), cfg.batch_size)

    # --- the loop: one iteration = one optimizer step over accum_steps micro-batches ---
    step_values = StepValues()
{%- if cookiecutter.loop == "plain" %}
    # Under torchrun, gradients are synced (DDP all-reduce, FSDP reduce-scatter) in the last micro-batch only.
    no_sync = functools.partial(distributed.no_gradient_sync, model)
{%- else %}
    # Several processes: gradients are all-reduced in the last micro-batch only. Not accelerator.accumulate():
    # it divides each micro-batch's loss by accum_steps, a mean of means that differs from the step's mean
    # when micro-batches hold different counts of terms (padding, masks); this loop divides by the count.
    no_sync = functools.partial(accelerator.no_sync, model)
{%- endif %}
    last_micro = cfg.accum_steps - 1
    lr = optimizer.param_groups[0]["lr"]
    start_step, stop_reason, outside_seconds = state.step, 0, 0.0  # outside: evaluating and saving
    model.train()
    progress = Progress(cfg, state.step, cfg.batch_size * cfg.accum_steps * ctx.world_size, ctx.is_main)
    # While the bar is drawn, log lines are written above it instead of through it.
    redirect = logging_redirect_tqdm() if progress.show_bar else contextlib.nullcontext()
    with stop, redirect:
        loop_started = time.perf_counter()
        while state.step < cfg.max_steps:
            step_loss = torch.zeros((), device=device)  # the loss summed over the step's terms, on the device
            step_count = torch.zeros((), device=device)  # how many terms (samples, tokens...) it summed
            for micro in range(cfg.accum_steps):
                inputs, targets = next(batches)
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                with no_sync() if micro < last_micro else contextlib.nullcontext():
{%- if cookiecutter.loop == "plain" %}
                    with precision.autocast():
                        loss_sum, count = compute_loss(model(inputs), targets)  # (sum, count): task.py
                    # The SUM's gradients accumulate; the step divides them by its total count below.
                    scaler.scale(loss_sum).backward()  # fp16: scaled up so small gradients do not underflow
{%- else %}
                    loss_sum, count = compute_loss(model(inputs), targets)  # (sum, count): task.py; autocast
                    # The SUM's gradients accumulate; the step divides them by its total count below.
                    accelerator.backward(loss_sum)  # fp16: scaled up so small gradients do not underflow
{%- endif %}
                step_loss += loss_sum.detach()
                step_count += count

            # Accumulation (and torchrun): the step's gradients are those of its mean loss over ALL its terms,
            # in every micro-batch of every rank, however many each holds (padding, masked targets): the
            # summed loss's gradients (DDP averaged them over ranks) divided by total count / world_size.
{%- if cookiecutter.loop == "plain" %}
            totals = ctx.sum_over_ranks(torch.stack((step_loss, step_count)))  # one 2-number all-reduce
            loss_sum, count = totals[0], totals[1].clamp(min=1)  # no terms at all: the sum is 0, the mean 0
            scaler.unscale_(optimizer)  # fp16: back to true gradients, before clipping sees them
            divide_gradients(params, count / ctx.world_size)
            grad_norm = clip_gradients(params, cfg.clip_grad_norm).to(device)  # (a CPU 0 if no gradient)
            # The non-finite guard: a step whose gradients hold an inf or NaN would corrupt the weights,
            # so it is skipped, on the device. Under DDP the gradients were all-reduced: every rank skips.
            skip = torch.isfinite(grad_norm).logical_not().float()  # float32, as found_inf must be
            lr = optimizer.param_groups[0]["lr"]
            optimizer_step(optimizer, skip)
            scaler.update()  # fp16: halve the scale after an overflow, grow it after 2000 clean steps
{%- else %}
            totals = accelerator.reduce(torch.stack((step_loss, step_count)), "sum")  # one 2-number all-reduce
            loss_sum, count = totals[0], totals[1].clamp(min=1)  # no terms at all: the sum is 0, the mean 0
            # Dividing fp16's still-scaled gradients is the same: the unscaling below divides them too.
            divide_gradients(params, count / ctx.world_size)
            # Unscales fp16's gradients (its GradScaler notes any inf), then clips; 0 = no clipping: no limit.
            grad_norm = accelerator.clip_grad_norm_(params, cfg.clip_grad_norm or math.inf)
            # The non-finite guard: a step with inf/NaN gradients (all-reduced: on every rank) is skipped, by a
            # host read per step, as Accelerate's step cannot skip on the device; fp16's GradScaler skips it itself.
            finite = bool(torch.isfinite(grad_norm))
            lr = optimizer.param_groups[0]["lr"]
            if finite or accelerator.scaler is not None:
                optimizer.step()
{%- endif %}
            # The schedule follows the loop's steps, skipped ones included: skips are rare (fp16's
            # first few while its scale settles), and max_bad_steps of them in a row end the run.
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            step_values.add(loss_sum / count, grad_norm)
            if state.step == start_step + 1:  # throughput from here on: the first step also started things up
                progress.restart_window(state.step, outside_seconds)

            # --- between steps: logging, validation, checkpoints (the only places values are read) ---
            final = state.step == cfg.max_steps
            do_log = final or state.step % cfg.log_every == 0
            do_eval = final or state.step % cfg.eval_every == 0
            do_ckpt = final or state.step % cfg.ckpt_every == 0
            # A stop request (SIGTERM, Ctrl-C, max_time_minutes) is acted on after the step it arrives in;
            # under torchrun the ranks agree on it at these steps only: the hot loop has no collective of its own.
            if not ctx.enabled or do_log or do_eval or do_ckpt:
                stop_reason = ctx.agree_max(stop.reason())
            if not (do_log or do_eval or do_ckpt or stop_reason):
                continue
            take_step_values(state, step_values.read(), scaler.is_enabled(), cfg)
            if do_log:
                record = train_record(state, lr)
                metrics_log.write(record, group="train")  # rank 0 only
                progress.update(state.step, record.get("loss"), lr, record.get("grad_norm"), outside_seconds)
            paused = time.perf_counter()
            # best: replaced only when the monitored metric improves (see validate).
            if do_eval:
                improved = validate(model, val_loader, device, precision, cfg, state, metrics_log, stop_evaluation)
                if improved:
                    save("best.pt")
                elif improved is None:  # abandoned: the ranks agreed on a stop request
                    stop_reason = ctx.agree_max(stop.reason())
            # Early stopping: patience evaluations in a row without a new best (the same verdict on every rank).
            out_of_patience = do_eval and cfg.patience > 0 and state.evals_since_best >= cfg.patience
            if stop_reason or out_of_patience or (do_ckpt and state.bad_streak == 0):
                save("last.pt")
            outside_seconds += time.perf_counter() - paused
            if stop_reason or out_of_patience:
                announce_stop(cfg, ctx, state, stop_reason)
                break
        train_seconds = time.perf_counter() - loop_started - outside_seconds
        progress.close(state.step)
    metrics_log.close()

    samples = (state.step - start_step) * progress.samples_per_step
    return finish(cfg, state, time.perf_counter() - started, train_seconds, samples, stop_reason)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m {{ cookiecutter.package_name }}.train",
        description="Train with the config file, then key=value overrides (e.g. lr=1e-3 max_steps=500).",
    )
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override one config field")
    args = parser.parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # Under torchrun only rank 0 talks; the others report errors only.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, format="%(message)s", stream=sys.stdout)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        if rank == 0:  # every rank reads the same config: one message is enough
            print(f"error: {e}", file=sys.stderr)
        return 2
    # From here an error may be raised on one rank only: each rank prints its own.
    error = f"error (rank {rank})" if world_size > 1 else "error"
    try:
        summary = train(cfg)
    except ConfigError as e:
        print(f"{error}: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, TrainingError, TrackerError) as e:
        print(f"{error}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        return 130
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
