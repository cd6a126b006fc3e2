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
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint, unwrap
from .config import Config, ConfigError, differences, dump_yaml, load_config, to_dict
from .data import build_datasets
from .evaluate import evaluate
from .loader import build_loaders
from .metrics import MetricsLog
from .model import build_model
from .precision import resolve_device, resolve_precision
from .schedule import build_scheduler
from .seed import rng_state, seed_everything, set_rng_state
from .signals import StopRequest
from .task import compute_loss

log = logging.getLogger(__name__)

SERIES = ("loss", "grad_norm", "skipped", "bad")
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt")
# Changing these on resume is harmless; any other difference is reported as one
# that makes the resumed run differ from an uninterrupted one.
SAFE_ON_RESUME = set(
    "max_steps eval_every log_every ckpt_every out_dir num_workers num_threads device max_bad_steps".split()
)


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


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Essential 4: clip the total gradient norm to ``max_norm`` (0 = off); return the norm before clipping."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
    return norm


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
    started = time.perf_counter()
    # --- set-up: everything is checked before any file is written ---
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    resume_from = resume_checkpoint_path(cfg)
    check_out_dir(cfg, resume_from)
    checkpoint = load_checkpoint(resume_from) if resume_from else None

    train_set, val_set = build_datasets(cfg)
    model = build_model(cfg)
    if checkpoint is not None:
        load_model_state(model, checkpoint["model"], resume_from)
    model.to(device)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = precision.make_scaler()
    batches, val_loader = build_loaders(cfg, train_set, val_set, device)

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
            progress = checkpoint["progress"]
            batches.load_state_dict(progress["data"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {resume_from} does not fit this run: {e}") from None
        step, best_metric, best_step = checkpoint["step"], checkpoint["best_metric"], progress["best_step"]
        last_metrics = checkpoint.get("metrics") or {}
        bad_streak, skipped_total = progress["bad_streak"], progress["skipped_total"]
        on_host = progress["unlogged_steps"]
        set_rng_state(checkpoint["rng"])

    # --- the run's folder ---
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        for name in RUN_FILES:  # only reached with overwrite=true, or an empty folder
            (out_dir / name).unlink(missing_ok=True)
    (out_dir / "config.yaml").write_text(dump_yaml(cfg))
    metrics_log = MetricsLog(out_dir / "metrics.jsonl")
    if checkpoint is not None:
        metrics_log.truncate_after(step)
        log.info("resumed from %s at step %d", resume_from, step)
    log.info(
        "training on %s, precision %s, %s parameters, %d samples per optimizer step",
        device,
        precision.name,
        f"{sum(p.numel() for p in model.parameters()):,}",
        cfg.batch_size * cfg.accum_steps,
    )

    def save(name: str) -> None:
        # Everything needed to continue exactly: tensors, numbers, strings, lists and dicts only.
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
                "data": batches.state_dict(),
                "best_step": best_step,
                "bad_streak": bad_streak,
                "skipped_total": skipped_total,
                "unlogged_steps": on_host,
            },
            "rng": rng_state(),
        }
        save_checkpoint(state, out_dir / name)

    def read_pending() -> None:
        """Move the per-step values from the device to the host: one sync, at log/eval/save steps only."""
        nonlocal bad_streak, skipped_total
        if not on_device["loss"]:
            return
        rows = torch.stack([torch.stack(on_device[k]).float() for k in SERIES]).T.tolist()
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
        metrics_log.write(record)
        log.info(
            "step %d  loss %.4f  lr %.3g  grad_norm %.3g",
            step,
            record.get("loss", math.nan),
            lr_used,
            record.get("grad_norm", math.nan),
        )

    # --- the loop: one iteration = one optimizer step over accum_steps micro-batches ---
    fp16_scale = scaler.get_scale() if scaler is not None else None
    lr_used = optimizer.param_groups[0]["lr"]
    model.train()
    with StopRequest() as stop:
        while step < cfg.max_steps:
            step_loss = torch.zeros((), device=device)
            for _ in range(cfg.accum_steps):
                inputs, targets = next(batches)
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                with precision.autocast():
                    loss = compute_loss(model(inputs), targets)
                # Mean loss / accum_steps: the summed gradients equal one batch of batch_size * accum_steps.
                scaled = loss / cfg.accum_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                step_loss += scaled.detach().float()

            if scaler is not None:
                scaler.unscale_(optimizer)  # once per step, before clipping sees the gradients
            grad_norm = clip_gradients(model, cfg.clip_grad_norm)
            loss_bad = ~torch.isfinite(step_loss)
            lr_used = optimizer.param_groups[0]["lr"]
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
                bad = loss_bad.float()
            else:
                bad = (loss_bad | ~torch.isfinite(grad_norm)).float()
                skipped = bad
                optimizer_step(optimizer, bad)
                scheduler.step()  # also after a skipped step: the skip is rare and stops the run if repeated
            optimizer.zero_grad(set_to_none=True)
            step += 1
            for name, value in zip(SERIES, (step_loss, grad_norm, skipped, bad), strict=True):
                on_device[name].append(value)

            # --- logging, validation, checkpoints (each reads from the device; the steps between do not) ---
            final = step == cfg.max_steps
            do_eval = step % cfg.eval_every == 0 or final
            do_ckpt = step % cfg.ckpt_every == 0 or final or stop.requested
            if step % cfg.log_every == 0 or do_eval or do_ckpt:
                read_pending()
            if step % cfg.log_every == 0 or final:
                write_train_record()
            if do_eval:
                last_metrics = evaluate(model, val_loader, device, precision)
                if cfg.monitor not in last_metrics:
                    raise ConfigError(
                        f"monitor '{cfg.monitor}' is not an evaluation metric; choose one of {sorted(last_metrics)}"
                    )
                value = last_metrics[cfg.monitor]
                new_best = is_better(value, best_metric, cfg.monitor_mode)
                metrics_log.write({"step": step, **last_metrics})
                shown = "  ".join(f"{k} {v:.4f}" for k, v in last_metrics.items())
                log.info("eval step %d  %s%s", step, shown, "  (new best)" if new_best else "")
                if new_best and bad_streak == 0:
                    best_metric, best_step = value, step
                    save("best.pt")
            if do_ckpt and (bad_streak == 0 or stop.requested):
                save("last.pt")
            if stop.requested:
                log.warning(
                    "stopped by signal %d at step %d; last.pt saved, resume with resume=auto", stop.signum, step
                )
                break

    seconds = time.perf_counter() - started
    return {
        "step": step,
        "seconds": seconds,
        "best_metric": best_metric,
        "best_step": best_step,
        "metrics": last_metrics,
        "skipped_steps": skipped_total,
        "stopped_by_signal": stop.signum,
        "exit_code": stop.exit_code if stop.requested else 0,
        "out_dir": str(out_dir),
        "monitor": cfg.monitor,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m {{ cookiecutter.package_name }}.train",
        description="Train with the config file, then key=value overrides (e.g. lr=1e-3 max_steps=500).",
    )
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override one config field")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        summary = train(load_config(args.config, args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        return 130
    best = summary["best_metric"]
    log.info(
        "done: %d steps in %.1fs; best %s %s at step %s; files in %s",
        summary["step"],
        summary["seconds"],
        summary["monitor"],
        f"{best:.4f}" if best is not None else "n/a",
        summary["best_step"],
        summary["out_dir"],
    )
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
