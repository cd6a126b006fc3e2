"""The training loop: read it top to bottom in ``train()``.

    python -m {{ cookiecutter.package_name }}.train --config configs/default.yaml [key=value ...]

The essentials each live in a file named after them: config.py, seed.py,
precision.py, schedule.py, checkpoint.py (+ evaluate.py for validation).
Yours to replace: data.py, model.py, task.py (loss and metric).

Exit status: 0 done; 1 training failed (non-finite steps, a failed save);
2 bad input (config, resume checkpoint); 128 + signal when stopped by SIGTERM
(143) or SIGINT (130) after writing last.pt.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint, unwrap
from .config import Config, ConfigError, differences, dump_yaml, load_config, to_dict
from .data import build_datasets
from .evaluate import evaluate
from .loader import build_loaders
from .metrics import MetricsLog, require_tensorboard
from .model import build_model
from .precision import allow_tf32, resolve_precision
from .progress import Progress, describe_run, summarize
from .schedule import build_scheduler
from .seed import rng_state, seed_everything, set_rng_state
from .signals import StopRequest
from .task import compute_loss

log = logging.getLogger(__name__)

SERIES = ("loss", "grad_norm", "skipped", "bad")
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt")
# Changing these on resume is harmless; any other difference is reported as one
# that makes the resumed run differ from an uninterrupted one.
SAFE_ON_RESUME = {
    *("max_steps", "eval_every", "log_every", "ckpt_every", "out_dir", "num_workers", "num_threads", "device"),
    *("max_bad_steps", "dist_timeout_minutes", "progress", "tensorboard", "compile", "tf32"),
}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite steps); exit code 1."""


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    # Weight decay on weight matrices and embeddings only: decaying biases and
    # norm gains towards zero only hurts.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel is fastest, and it can skip a non-finite step on the
    # device (see optimizer_step), so the loop needs no host sync per step.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None, foreach=None if fused else True)


def clip_gradients(params: list[nn.Parameter], max_norm: float, on_host: bool = False) -> torch.Tensor:
    """Essential 4: clip the total gradient norm to ``max_norm`` (0 = off); return the norm before clipping.

    The same arithmetic as ``torch.nn.utils.clip_grad_norm_`` (a test checks it), in two
    multi-tensor kernels without its per-call grouping work: half its cost on small models.
    ``on_host``: the gradients are in host memory (see ``reads_are_free``), so the norm is
    read and the gradients are scaled only when it is over ``max_norm``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm > 0:
        if not on_host:
            torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        elif (factor := max_norm / (norm.item() + 1e-6)) < 1.0:  # False for a NaN norm too
            torch._foreach_mul_(grads, factor)
    return norm


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


def optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """Step unless ``skip`` (a float 0/1 tensor on the device) is set, without reading it on the host if possible."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        # Fused optimizers take GradScaler's found_inf flag and skip on the device.
        optimizer.grad_scale, optimizer.found_inf = None, skip
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not skip.item():  # any other optimizer: one host read per step
        optimizer.step()


def reads_are_free(device: torch.device) -> bool:
    """True where the device is the host (the CPU): reading a value there is a memory read, not a sync.

    The loop then decides clipping and skipping in Python instead of with tensor flags and the
    fused optimizer's skip; on a small model that saves about 10% of every step.
    """
    return device.type == "cpu"


def resume_checkpoint_path(cfg: Config) -> Path | None:
    if cfg.resume == "":
        return None
    if cfg.resume == "auto":
        path = Path(cfg.out_dir) / "last.pt"
        return path if path.exists() else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise ConfigError(f"resume checkpoint {path} does not exist (use resume=auto to continue only if there is one)")
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
    for key, (old, new) in changes.items():
        note = "" if key in SAFE_ON_RESUME else "  (the resumed run will differ from an uninterrupted one)"
        log.warning("resume: %s changed from %r to %r%s", key, old, new, note)
    if changes:
        log.info("resume: %d config change(s) against %s", len(changes), path)


def is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return math.isfinite(value)
    return value < best if mode == "min" else value > best


def train(cfg: Config) -> dict[str, Any]:
    """Train as ``cfg`` says; return a summary. Raises ConfigError, CheckpointError or TrainingError."""
    ctx, device = distributed.setup(cfg.device, cfg.dist_timeout_minutes)
    try:
        summary = _train(cfg, ctx, device)
    except BaseException:
        distributed.cleanup(ctx, wait_for_others=False)
        raise
    distributed.cleanup(ctx)
    return summary


def _train(cfg: Config, ctx: distributed.Dist, device: torch.device) -> dict[str, Any]:
    started = time.perf_counter()
    # --- set-up: everything is checked before any file is written ---
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    precision = resolve_precision(cfg.precision, device)
    allow_tf32(device, cfg.tf32)
    if cfg.tensorboard:
        require_tensorboard()
    resume_from = resume_checkpoint_path(cfg)
    check_out_dir(cfg, resume_from)
    checkpoint = load_checkpoint(resume_from) if resume_from else None

    train_set, val_set = build_datasets(cfg)
    model = build_model(cfg)  # the same initial weights on every rank: same seed
    if checkpoint is not None:
        load_model_state(model, checkpoint["model"], resume_from)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = precision.make_scaler()
    batches, val_loader = build_loaders(cfg, train_set, val_set, device, ctx.rank, ctx.world_size)
    if ctx.enabled:
        seed_everything(cfg.seed + ctx.rank)  # each rank its own dropout/augmentation stream
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        model = compile_model(model, device)
    # One process on the CPU: clipping and skipping read their values on the host (see reads_are_free).
    # Under torchrun every rank must skip together, which the device path's all-reduce ensures.
    host_decides = reads_are_free(device) and not ctx.enabled

    step, best_metric, best_step, last_metrics = 0, None, None, {}
    # Per-step values (loss, grad norm, skipped, bad) stay on the device until a log, eval
    # or save step reads them all at once; on_host holds them from then until the next log record.
    on_device: dict[str, list[torch.Tensor]] = {k: [] for k in SERIES}
    on_host: list[list[float]] = []
    bad_streak, skipped_total = 0, 0
    if checkpoint is not None:
        report_config_changes(checkpoint["config"], cfg, resume_from)
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            if scaler is not None and checkpoint["scaler"]:
                scaler.load_state_dict(checkpoint["scaler"])
            saved = checkpoint["progress"]
            batches.load_state_dict(saved["data"], cfg.batch_size * ctx.world_size)
            rng = checkpoint["rng"]
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {resume_from} does not fit this run: {e}") from None
        step, best_metric, best_step = checkpoint["step"], checkpoint["best_metric"], saved["best_step"]
        last_metrics = checkpoint.get("metrics") or {}
        bad_streak, skipped_total = saved["bad_streak"], saved["skipped_total"]
        on_host = saved["unlogged_steps"]
        if len(rng) == ctx.world_size:
            set_rng_state(rng[ctx.rank])
        else:  # another world size: fresh streams, still a function of the seed
            log.warning("resume: saved by %d process(es), now %d; random streams restart", len(rng), ctx.world_size)
            seed_everything(cfg.seed + ctx.rank + 1_000_003 * step)

    # --- the run's folder (rank 0 writes; the others only read what it wrote) ---
    out_dir = Path(cfg.out_dir)
    metrics_log = MetricsLog(out_dir / "metrics.jsonl")
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            for name in RUN_FILES:  # only reached with overwrite=true, or an empty folder
                (out_dir / name).unlink(missing_ok=True)
            shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
        if cfg.tensorboard:
            metrics_log.add_tensorboard(out_dir / "tensorboard", first_step=step)
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
        if checkpoint is not None:
            metrics_log.truncate_after(step)
    ctx.barrier()
    describe_run(cfg, device, precision.name, sum(p.numel() for p in params), ctx.world_size,
                 f"resumed from {resume_from} at step {step}" if checkpoint is not None else "")  # fmt: skip

    def save(name: str) -> None:
        # Everything needed to continue exactly: tensors, numbers, strings, lists and dicts only.
        rng = ctx.gather(rng_state())  # every rank's streams; a collective, so every rank calls save
        error = None
        if ctx.is_main:
            state = {
                "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "config": to_dict(cfg),
                "step": step,
                "best_metric": best_metric,
                "metrics": last_metrics,
                "progress": {
                    "data": batches.state_dict(cfg.batch_size * ctx.world_size),
                    "best_step": best_step,
                    "bad_streak": bad_streak,
                    "skipped_total": skipped_total,
                    "unlogged_steps": on_host,
                },
                "rng": rng,
            }
            try:
                save_checkpoint(state, out_dir / name)
            except CheckpointError as e:
                error = e
        if ctx.agree_max(error is not None):  # every rank stops when rank 0 could not save
            raise error or CheckpointError(f"rank 0 could not save {out_dir / name}")

    def read_pending() -> None:
        """Move the per-step values from the device to the host: one sync, at log/eval/save steps only."""
        nonlocal bad_streak, skipped_total
        if not on_device["loss"]:
            return
        # Tensors, except the flags decided on the host (Python floats) when host_decides.
        rows = torch.stack(
            [torch.stack(v).float() if torch.is_tensor(v[0]) else torch.tensor(v) for v in on_device.values()]
        ).T
        if ctx.enabled:  # the mean over ranks (grad norms and flags are the same on every rank)
            torch.distributed.all_reduce(rows)
            rows /= ctx.world_size
        rows = rows.tolist()
        first_step = step - len(rows) + 1
        for values in on_device.values():
            values.clear()
        for offset, (loss, norm, skipped, bad) in enumerate(rows):
            on_host.append([first_step + offset, loss, norm, skipped, bad])
            skipped_total += int(skipped)
            bad_streak = bad_streak + 1 if bad else 0
            if bad_streak >= cfg.max_bad_steps:
                raise TrainingError(
                    f"{bad_streak} consecutive steps with a non-finite loss or gradient (last at step "
                    f"{first_step + offset}); stopping. best.pt and last.pt hold the state from before them"
                )
        skipped_steps = [first_step + offset for offset, row in enumerate(rows) if row[2]]
        if skipped_steps:
            log.warning("skipped %d step(s) with non-finite values: %s", len(skipped_steps), skipped_steps)

    def write_train_record() -> None:
        if not on_host:
            return
        kept = [row for row in on_host if not row[3]]  # averages over the steps that were taken
        record = {"step": step, "lr": lr_used, "skipped": sum(int(row[3]) for row in on_host)}
        if kept:
            record["loss"] = sum(row[1] for row in kept) / len(kept)
            record["grad_norm"] = sum(row[2] for row in kept) / len(kept)
        on_host.clear()
        if ctx.is_main:
            metrics_log.write(record)
        progress.update(step, record.get("loss"), lr_used, record.get("grad_norm"), outside_steps)

    # --- the loop: one iteration = one optimizer step over accum_steps micro-batches ---
    fp16_scale = scaler.get_scale() if scaler is not None else None
    lr_used = optimizer.param_groups[0]["lr"]
    # Under DDP, gradients are all-reduced in the backward of the last micro-batch only.
    no_sync = model.no_sync if ctx.enabled else contextlib.nullcontext
    last_micro = cfg.accum_steps - 1
    stopped_by = 0
    start_step = step
    outside_steps = 0.0  # seconds spent evaluating and saving, reported apart from training throughput
    model.train()
    progress = Progress(cfg, step, cfg.batch_size * cfg.accum_steps * ctx.world_size, ctx.is_main)
    # While the bar is drawn, log lines are written above it instead of through it.
    redirect = logging_redirect_tqdm() if progress.show_bar else contextlib.nullcontext()
    with StopRequest() as stop, redirect:
        loop_started = time.perf_counter()
        while step < cfg.max_steps:
            step_loss = None
            for micro in range(cfg.accum_steps):
                inputs, targets = next(batches)
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                with no_sync() if micro < last_micro else contextlib.nullcontext():
                    with precision.autocast():
                        loss = compute_loss(model(inputs), targets)
                    if cfg.accum_steps > 1:
                        # Mean loss / accum_steps: the summed gradients equal one batch of batch_size * accum_steps.
                        loss = loss / cfg.accum_steps
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()

            if scaler is not None:
                scaler.unscale_(optimizer)  # once per step, before clipping sees the gradients
            grad_norm = clip_gradients(params, cfg.clip_grad_norm, host_decides)
            lr_used = optimizer.param_groups[0]["lr"]
            # A step whose loss or gradient norm is inf/NaN is skipped; "bad" records it (1.0, else 0.0).
            if scaler is not None:
                # fp16: the scaler skips steps whose gradients overflowed; that is its normal
                # calibration, so only a non-finite loss counts as bad. One host read per step
                # (the scale) tells whether the schedule should advance.
                scaler.step(optimizer)
                scaler.update()
                new_scale = scaler.get_scale()
                skipped = torch.tensor(float(new_scale < fp16_scale), device=device)
                if new_scale >= fp16_scale:
                    scheduler.step()
                fp16_scale = new_scale
                bad = torch.nan_to_num(step_loss * 0, nan=1.0)
            elif host_decides:  # the CPU, one process: the values are in host memory, read them
                bad = float(not math.isfinite(step_loss.item() + grad_norm.item()))
                if not bad:
                    optimizer.step()
                skipped = bad
                scheduler.step()  # also after a skipped step: the skip is rare and stops the run if repeated
            else:  # GPUs: decided on the device with no host read (x * 0 is 0 if x is finite, else NaN)
                bad = torch.nan_to_num((step_loss + grad_norm) * 0, nan=1.0)
                if ctx.enabled:
                    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # every rank skips, or none
                skipped = bad
                optimizer_step(optimizer, bad)
                scheduler.step()  # also after a skipped step: the skip is rare and stops the run if repeated
            optimizer.zero_grad(set_to_none=True)
            step += 1
            for name, value in zip(SERIES, (step_loss, grad_norm, skipped, bad), strict=True):
                on_device[name].append(value)

            # --- logging, validation, checkpoints (each reads from the device; the steps between do not) ---
            stopped_by = ctx.agree_max(stop.signum or 0)  # a signal to any rank stops every rank
            final = step == cfg.max_steps
            do_eval = step % cfg.eval_every == 0 or final
            do_ckpt = step % cfg.ckpt_every == 0 or final or stopped_by
            do_log = step % cfg.log_every == 0 or final
            if not (do_log or do_eval or do_ckpt):
                continue
            read_pending()
            if do_log:
                write_train_record()
            outside_started = time.perf_counter()
            if do_eval:
                last_metrics = evaluate(model, val_loader, device, precision)
                if cfg.monitor not in last_metrics:
                    raise ConfigError(
                        f"monitor '{cfg.monitor}' is not an evaluation metric; choose one of {sorted(last_metrics)}"
                    )
                value = last_metrics[cfg.monitor]
                new_best = is_better(value, best_metric, cfg.monitor_mode)
                if ctx.is_main:
                    metrics_log.write({"step": step, **last_metrics})
                shown = "  ".join(f"{k} {v:.4f}" for k, v in last_metrics.items())
                log.info("eval step %d  %s%s", step, shown, "  (new best)" if new_best else "")
                if new_best and bad_streak == 0:
                    best_metric, best_step = value, step
                    save("best.pt")
            if do_ckpt and (bad_streak == 0 or stopped_by):
                save("last.pt")
            outside_steps += time.perf_counter() - outside_started
            if stopped_by:
                log.warning("stopped by signal %d at step %d; last.pt saved, resume with resume=auto", stopped_by, step)
                break
        train_seconds = time.perf_counter() - loop_started - outside_steps
        progress.close()
    metrics_log.close()

    steps_run = step - start_step
    summary = {
        "step": step,
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "best_metric": best_metric,
        "best_step": best_step,
        "metrics": last_metrics,
        "skipped_steps": skipped_total,
        "stopped_by_signal": stopped_by or None,
        "exit_code": 128 + stopped_by if stopped_by else 0,
        "out_dir": str(out_dir),
        "monitor": cfg.monitor,
        "samples_per_second": steps_run * progress.samples_per_step / max(train_seconds, 1e-9),
    }
    summarize(summary, out_dir)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m {{ cookiecutter.package_name }}.train",
        description="Train with the config file, then key=value overrides (e.g. lr=1e-3 max_steps=500).",
    )
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override one config field")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    # Under torchrun only rank 0 talks; the others report errors only.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, format="%(message)s", stream=sys.stdout)
    try:
        summary = train(load_config(args.config, args.overrides))
    except ConfigError as e:
        if rank == 0:  # every rank has the same config: one message is enough
            print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, TrainingError) as e:
        print(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        return 130
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
