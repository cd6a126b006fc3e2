"""The training loop: ``train_step`` is one optimizer step, ``run`` the loop around it.

    python -m {{ cookiecutter.package_name }}.train --config configs/default.yaml [key=value ...]
{%- if cookiecutter.loop == "accelerate" %}
    accelerate launch --num_processes=N -m {{ cookiecutter.package_name }}.train --config ...   (or torchrun)

Written with Hugging Face Accelerate: its ``Accelerator`` (distributed.setup) picks the
device, joins the processes, wraps the model in DDP, autocasts its forward and scales
fp16 losses; the loop keeps the rest (the step's exact mean, the guard, checkpoints, resume).
{%- endif %}

The six essentials each live in a file named after them, in essentials/: config.py,
seed.py, precision.py, clipping.py, schedule.py, validation.py + checkpoint.py.
What a run needs besides (processes, batches, the run folder, signals, progress)
is in machinery/. Yours to replace: data.py, model.py, task.py (loss and metric).

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
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from . import model as your_model
from .data import build_datasets  # yours: data.py, model.py, task.py
from .essentials import (  # the lesson: essentials/, each essential in the file named after it
    CheckpointError,
    Config,
    ConfigError,
    LastCheckpoint,
    Precision,
    WeightEMA,
    allow_tf32,
    build_optimizer,
    build_scheduler,
    check_monitor,
    clip_gradients,
    fit_first_scale,
    hidden_matrices,
    load_config,
    load_weights,
    monitor_goal,
    optimizer_step,
    read_on_every_rank,
    resolve_precision,
    restore_training,
    save_best,
    save_snapshot,
    seed_everything,
    validate,
)
from .machinery import (  # what a run needs besides: processes, batches, the run folder, signals, progress
    Progress,
    Speed,
    StopRequest,
    TrackerError,
    TrainingError,
    TrainState,
    build_loaders,
    describe_run,
    distributed,
    profiling,
    run_folder,
    workers_ended,
)
from .model import build_model
from .task import compute_loss

log = logging.getLogger(__name__)
# The model's blocks (FSDP's units, activation checkpointing's): model.py's blocks(), else each child with parameters.
blocks = getattr(your_model, "blocks", distributed.children_with_parameters)
# optimizer=muon: the weights Muon updates (AdamW the rest): model.py's hidden_matrices(), else optimizer.py's.
muon_matrices = getattr(your_model, "hidden_matrices", hidden_matrices)


def terms_of(count: torch.Tensor | int, process: distributed.Process) -> torch.Tensor:
    """compute_loss's count as a float32 tensor of its own on this process's device (a collective may change it)."""
    return torch.zeros((), device=process.device) + count


def divide_gradients(params: list[nn.Parameter], divisor: torch.Tensor) -> None:
    """Divide every gradient by ``divisor``, a tensor (no host sync); a model may span several devices."""
    grads_on: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            grads_on.setdefault(p.grad.device, []).append(p.grad)
    for device, grads in grads_on.items():
        torch._foreach_div_(grads, divisor.to(device))


def train_step(state: TrainState, process: distributed.Process, precision: Precision) -> None:
    """One optimizer step over ``accum_steps`` micro-batches: the anatomy of a training step."""
    cfg, model, optimizer = state.cfg, state.model, state.optimizer
    step_loss = torch.zeros((), device=process.device)  # the step's loss, summed over its terms, on the device
    step_count = torch.zeros((), device=process.device)  # how many terms (samples, tokens...) it summed
    for micro in range(cfg.accum_steps):
        inputs, targets = (tensor.to(process.device, non_blocking=True) for tensor in next(state.batches))
        # Accumulation: gradients add up over the micro-batches, and processes sync them in the last one only.
{%- if cookiecutter.loop == "plain" %}
        accumulating = micro < cfg.accum_steps - 1  # (FSDP, unless fsdp_accumulate=whole, syncs every one)
        with distributed.no_gradient_sync(model, cfg.fsdp_accumulate) if accumulating else contextlib.nullcontext():
            with precision.autocast():  # 3. Mixed precision: the forward and the loss in bf16 or fp16
                loss_sum, count = compute_loss(model(inputs), targets)  # task.py: the loss SUMMED, and its count
            if state.step == 0 and micro == 0 and state.scaler.is_enabled():  # fp16: a first scale for a summed loss
                fit_first_scale(state.scaler, process.sum_over_ranks(terms_of(count, process)) / process.world_size)
            state.scaler.scale(loss_sum).backward()  # fp16: scaled up, so that small gradients do not underflow
{%- else %}
        with contextlib.nullcontext() if micro == cfg.accum_steps - 1 else process.accelerator.no_sync(model):
            # 3. Mixed precision: the prepared model autocasts its forward to bf16 or fp16.
            loss_sum, count = compute_loss(model(inputs), targets)  # task.py: the loss SUMMED, and its count
            if state.step == 0 and micro == 0 and state.scaler.is_enabled():  # fp16: a first scale for a summed loss
                fit_first_scale(state.scaler, process.accelerator.reduce(terms_of(count, process), "mean"))
            process.accelerator.backward(loss_sum)  # fp16: scaled up, so that small gradients do not underflow
{%- endif %}
        step_loss += loss_sum.detach()
        step_count += count
    # Accumulation, exact: the step's gradients are those of its MEAN loss over all its terms, in every
    # micro-batch of every process: the summed loss's gradients, averaged over processes, / (count / processes).
{%- if cookiecutter.loop == "plain" %}
    step_loss, step_count = process.sum_over_ranks(torch.stack((step_loss, step_count))).unbind()
{%- else %}
    step_loss, step_count = process.accelerator.reduce(torch.stack((step_loss, step_count)), "sum").unbind()
{%- endif %}
    step_count = step_count.clamp(min=1)  # no terms at all: the sum is 0, and so is the mean
    divide_gradients(state.params, step_count / process.world_size)
{%- if cookiecutter.loop == "plain" %}
    state.scaler.unscale_(optimizer)  # fp16: the true gradients, before clipping measures them
    grad_norm = clip_gradients(state.params, cfg.clip_grad_norm)  # 4. Gradient clipping; the norm before it
    # The non-finite guard: a step whose gradients hold an inf or NaN is skipped, decided on the device.
    optimizer_step(optimizer, skip=torch.where(grad_norm.isfinite(), 0.0, 1.0))
    state.scaler.update()  # fp16: a smaller scale after an overflow, a larger one after 2000 clean steps
{%- else %}
    # 4. Gradient clipping, after unscaling fp16's gradients; the norm before it. 0: no limit.
    grad_norm = clip_gradients(process.accelerator, state.params, cfg.clip_grad_norm)
    # The non-finite guard: a step whose gradients hold an inf or NaN is skipped, decided on the device: by fp16's
    # GradScaler (which also lowers its scale), or by the optimizer Accelerate wraps (its own step has no flag).
    if process.accelerator.scaler is not None:
        optimizer.step()
    else:
        optimizer_step(optimizer.optimizer, skip=torch.where(grad_norm.isfinite(), 0.0, 1.0))
{%- endif %}
    state.ema.update(state.step)  # weight EMA (ema_decay): the average moves towards the new weights
    state.step_log.add(step_loss, step_count, grad_norm, optimizer.param_groups[0]["lr"])  # read at a log step
    state.scheduler.step()  # 5. LR schedule: the next step's learning rate (a skipped step counts too)
    optimizer.zero_grad(set_to_none=True)
    state.step += 1


def checkpointing_activations(build_model: Callable[[Config], nn.Module], blocks: Callable) -> Callable:
    """``build_model``, whose blocks then keep only their inputs in the forward and compute their activations
    again in the backward (torch.utils.checkpoint, non-reentrant; the same random draws both times)."""

    def build(cfg: Config) -> nn.Module:
        model = build_model(cfg)
        for block in blocks(model):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        return model

    return build


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


def set_up(
    cfg: Config, process: distributed.Process, precision: Precision
) -> tuple[TrainState, dict[str, DataLoader], Path | None]:
    """The state of the run (fresh, resumed from a checkpoint, or started from one's weights), the validation
    data (a loader per set), and the checkpoint it resumed from, if any. Everything is checked before any file
    is written."""
    seed_everything(cfg.seed)  # 2. Seed: once, first; the same initial weights on every rank
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    allow_tf32(process.device, cfg.tf32)
    monitor_goal(cfg)
    resume_from, init_from = run_folder.choose_start(cfg, process)
    saved = read_on_every_rank(resume_from or init_from, process)  # before anything is built: it may not be readable
    train_set, val_sets = build_datasets(cfg)  # val_sets: one validation set, or several by name
{%- if cookiecutter.loop == "plain" %}
    # Built in CPU memory, then on the device; under torchrun in DDP, or sharded (parallel=fsdp: rank 0 builds it,
    # the others only their shards; by blocks in model.py, so that no GPU holds the whole model); the optimizer.
    build = checkpointing_activations(build_model, blocks) if cfg.activation_checkpointing else build_model
    model = distributed.parallelize(build, cfg, process, precision, blocks)
    optimizer = build_optimizer(model, cfg, process.device, muon_matrices)
    # A GradScaler for fp16 (agreeing on overflows across FSDP's shards); for bf16 and fp32 one that does nothing.
    scaler = precision.make_scaler(sharded=process.has_peers and cfg.parallel == "fsdp")
{%- else %}
    # Accelerate: DDP under several processes, autocast around the forward, fp16's GradScaler in the step. Not
    # the schedule: a torch LR scheduler prepared by Accelerate steps num_processes times per optimizer step (it
    # counts batches per process); this one counts optimizer steps, on any number of processes.
    build = checkpointing_activations(build_model, blocks) if cfg.activation_checkpointing else build_model
    model = build(cfg).to(process.device)
    model, optimizer = process.accelerator.prepare(model, build_optimizer(model, cfg, process.device, muon_matrices))
    # Accelerate's GradScaler for fp16 on a GPU; otherwise one that does nothing (checkpoints hold its state).
    scaler = process.accelerator.scaler or torch.amp.GradScaler(process.device.type, enabled=False)
{%- endif %}
    batches, val_loaders = build_loaders(cfg, train_set, val_sets, process)
    check_monitor(cfg, val_loaders)
    if process.has_peers:
        seed_everything(cfg.seed + process.rank)  # each rank its own dropout/augmentation stream
    if cfg.compile:
        model = compile_model(model, process.device)
    ema = WeightEMA(model, cfg.ema_decay, cfg.ema_start)  # the weights' moving average, if asked for
    state = TrainState(cfg, model, optimizer, build_scheduler(optimizer, cfg), scaler, batches, ema)
    if resume_from is not None:
        run_folder.report_config_changes(saved["config"], cfg, resume_from, saved["step"])
        restore_training(resume_from, saved, state, process)
    elif init_from is not None:  # fine-tuning: only the weights; optimizer, schedule and step start afresh
        load_weights(model, saved, init_from)
    return state, val_loaders, resume_from


def train(cfg: Config) -> dict[str, Any]:
    """Train as ``cfg`` says; return a summary. Raises ConfigError, CheckpointError or TrainingError."""
    process = distributed.setup(cfg)
    try:  # stop requests (SIGTERM, Ctrl-C, the time limit) from here: one during set-up stops after the first step
        with run_folder.one_run_per_folder(cfg, process), StopRequest(cfg.max_time_minutes) as stop:
            summary = run(cfg, process, stop)
    except BaseException:
        distributed.cleanup(process, wait_for_others=False)
        raise
    distributed.cleanup(process)
    return summary


def run(cfg: Config, process: distributed.Process, stop: StopRequest) -> dict[str, Any]:
    """Set up; then the loop: one train_step per optimizer step, and between steps whatever is due."""
    started = time.perf_counter()
    precision = resolve_precision(cfg.precision, process.device)
    state, val_loaders, resumed_from = set_up(cfg, process, precision)
    metrics_log = run_folder.open_run_folder(state, process, resumed=resumed_from is not None)
    resumed = f"resumed from {resumed_from} at step {state.step}" if resumed_from else ""
    describe_run(cfg, process.device, precision.name, sum(p.numel() for p in state.params), process.world_size, resumed)
    log.info("data:       %s", state.batches.describe())
    best = Path(cfg.out_dir) / "best.pt"
    last = LastCheckpoint(run_folder.latest_checkpoint(cfg), process, cfg.async_save)  # the latest state
    evaluating_together = distributed.evaluation_agreement(process, stop)  # the processes stop, or go on, together
    stop_agreement = distributed.AgreedNextStep(process)
    start_step, stop_reason, outside_seconds = state.step, 0, 0.0  # outside: evaluating and saving
    # On every way out, an error's too: DataLoader workers are ended (they ignore SIGTERM: machinery/loader.py),
    # and a write of last in the background is committed.
    loaders = (state.batches, *val_loaders.values())
    with workers_ended(*loaders), last.committed_at_exit(), profiling(cfg, process) as profiler:
        if state.eval_due:  # the evaluation a stop request cut short, done first, as the uninterrupted run did
            if validate(state, val_loaders, process, precision, metrics_log, distributed.evaluation_agreement(process)):
                save_best(best, state, process)
        state.model.train()
        speed = Speed(cfg, process.device, val_loaders, build_model, compute_loss)  # tokens/s, memory, mfu
        global_batch = cfg.batch_size * cfg.accum_steps * process.world_size
        progress = Progress(cfg, state.step, global_batch, process.is_main, speed)
        # While the bar is drawn, log lines are written above it instead of through it.
        with logging_redirect_tqdm() if progress.show_bar else contextlib.nullcontext():
            while state.step < cfg.max_steps:
                profiler.step(state.step)  # profile_steps=A-B: a trace of steps A to B (machinery/profiler.py)
                train_step(state, process, precision)
                if state.step == start_step + 1:  # throughput from here on: the first step also started things up
                    progress.restart_window(state.step, outside_seconds)

                # --- between steps: logging, validation, checkpoints (the only places values are read) ---
                final = state.step == cfg.max_steps
                do_log = final or state.step % cfg.log_every == 0
                do_eval = final or state.step % cfg.eval_every == 0
                do_ckpt = final or state.step % cfg.ckpt_every == 0
                do_keep = cfg.keep_every > 0 and state.step % cfg.keep_every == 0  # a snapshot, kept
                # A stop request (SIGTERM, Ctrl-C, max_time_minutes) is acted on after the step it arrives in; under
                # torchrun after the next one, every rank at the same step: the requests travel while it runs.
                stop_reason = stop_agreement.exchange(stop.reason())
                if not (do_log or do_eval or do_ckpt or do_keep or stop_reason):
                    continue
                state.step_log.read(state.step, state.scaler.is_enabled(), cfg.max_bad_steps)
                if do_log:
                    record = state.step_log.record(state.step)
                    progress.update(state.step, record, state.step_log.terms_per_step, outside_seconds)  # + speed
                    metrics_log.write(record, group="train")  # rank 0 only
                paused = time.perf_counter()
                # 6. Validation + best checkpoint: best.pt is replaced only when the monitored metric improves.
                if do_eval:
                    improved = validate(state, val_loaders, process, precision, metrics_log, evaluating_together)
                    if improved:
                        save_best(best, state, process)
                    elif improved is None:  # abandoned: the ranks agreed on a stop request
                        stop_reason = process.agree_max(stop.reason())
                # Early stopping: patience evaluations in a row without a new best (the same verdict on every rank).
                out_of_patience = do_eval and cfg.patience > 0 and state.evals_since_best >= cfg.patience
                if stop_reason or out_of_patience or (do_ckpt and state.step_log.bad_streak == 0):
                    last.save(state)  # in the background (async_save): the step waits only for a copy
                if do_keep and state.step_log.bad_streak == 0:
                    save_snapshot(Path(cfg.out_dir), state, process)
                outside_seconds += time.perf_counter() - paused
                if stop_reason or out_of_patience:
                    run_folder.announce_stop(state, process, stop_reason)
                    break
            stop_agreement.settle()
            train_seconds, samples = progress.close(state.step, outside_seconds)
    metrics_log.close()
    return run_folder.finish(state, time.perf_counter() - started, train_seconds, samples, stop_reason)


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
