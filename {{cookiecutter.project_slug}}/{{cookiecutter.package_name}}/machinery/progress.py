"""What the run tells you: a start block, a progress bar (or plain lines), and an end summary.

The bar is shown on rank 0 when stdout is a terminal at least ``MIN_BAR_COLUMNS``
wide and ``progress: true``; in CI, a cluster log, a pipe or a terminal too narrow
for a bar, a plain line is logged every ``log_every`` steps instead, with the
elapsed time and an estimate of the time left. Both refresh only at log steps,
when the loop has read its values from the device anyway: no extra host-device sync.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..essentials.config import Config, differences, to_dict
from .speed import Speed

log = logging.getLogger(__name__)


def describe_run(cfg: Config, device: Any, precision: str, parameters: int, world_size: int, resumed: str) -> None:
    changed = differences(to_dict(Config()), to_dict(cfg))
    shown = ", ".join(f"{key}={new}" for key, (_, new) in changed.items()) or "(all defaults)"
    log.info("run:        %s (%s)", cfg.out_dir, resumed or "fresh start")
    log.info("config:     %s", shown)
    log.info("device:     %s x %d process(es), precision %s (asked: %s)", device, world_size, precision, cfg.precision)
    if cfg.num_threads:
        threads = f"{torch.get_num_threads()} (num_threads={cfg.num_threads})"
    else:  # torch's default fits an idle machine; other jobs, or a tiny model, make the threads wait on each other
        threads = f"{torch.get_num_threads()} (torch's default, one per core; num_threads=1 is faster for a small "
        threads += "model or on a machine that runs other jobs)"
    log.info("threads:    %s CPU threads per process", threads)
    log.info("model:      %s parameters", f"{parameters:,}")
    log.info(
        "batch:      %d samples per optimizer step = %d x %d accum x %d process(es)",
        cfg.batch_size * cfg.accum_steps * world_size,
        cfg.batch_size,
        cfg.accum_steps,
        world_size,
    )


MIN_BAR_COLUMNS = 40  # narrower (a terminal that reports 0 columns, say) gets plain lines


def terminal_columns() -> int:
    """The width of the terminal stdout is, or 0 when it is not one."""
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else 0
    except (OSError, ValueError):  # no real file descriptor (captured output)
        return 0


def clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
    """Step counter with throughput; draws a tqdm bar or logs plain lines, refreshed at log steps."""

    def __init__(self, cfg: Config, step: int, samples_per_step: int, is_main: bool, speed: Speed):
        self.samples_per_step, self.total, self.speed = samples_per_step, cfg.max_steps, speed
        self.show_bar = is_main and cfg.progress and terminal_columns() >= MIN_BAR_COLUMNS
        # The loss shown is the mean over the last log_every steps: smoothed, and read at no extra cost.
        self.bar = tqdm(
            total=cfg.max_steps,
            initial=step,
            unit="step",
            dynamic_ncols=True,
            file=sys.stdout,
            disable=not self.show_bar,
            mininterval=0,
            smoothing=0.1,
        )
        self.started = self.last_time = time.perf_counter()
        self.last_step, self.last_excluded = step, 0.0
        self.samples_per_second = self.steps_per_second = 0.0
        self.first_step = step
        self.timed_from = (step, self.started, 0.0)  # the run's throughput counts from: (step, time, excluded)

    def restart_window(self, step: int, excluded: float) -> None:
        """Measure throughput from here, the bar's and the run's: called after the first step, whose start-up
        (compiling, DataLoader workers, lazy initialisation) is not training speed."""
        self.last_step, self.last_time, self.last_excluded = step, time.perf_counter(), excluded
        self.timed_from = (step, self.last_time, excluded)

    def update(self, step: int, record: dict[str, Any], terms_per_step: float, excluded: float) -> None:
        """Show a log ``record`` (its loss: the mean over the steps since the last one) and add the speed to it:
        tokens_per_s, peak_memory_mb, mfu (speed.py). ``excluded``: seconds so far spent evaluating and saving,
        left out of the throughput."""
        now = time.perf_counter()
        busy = now - self.last_time - (excluded - self.last_excluded)
        if step > self.last_step:
            self.steps_per_second = (step - self.last_step) / max(busy, 1e-9)
            self.samples_per_second = self.steps_per_second * self.samples_per_step
        self.last_step, self.last_time, self.last_excluded = step, now, excluded
        record.update(self.speed.measure(self.steps_per_second, terms_per_step))
        loss, grad_norm = record.get("loss", float("nan")), record.get("grad_norm", float("nan"))
        # tokens/s where the loss counts something else than samples (tokens, pixels); one term a sample: samples/s.
        tokens = f"  {record['tokens_per_s']:,.0f} tokens/s" if terms_per_step != self.samples_per_step else ""
        memory = f"  peak {record['peak_memory_mb']:,.0f} MB" if "peak_memory_mb" in record else ""
        mfu = f"  mfu {record['mfu']:.1%}" if "mfu" in record else ""
        if self.show_bar:
            speed = f"{self.samples_per_second:,.0f} samples/s{tokens}{memory}{mfu}"
            self.bar.set_postfix_str(f"loss {loss:.4f}  lr {record['lr']:.2e}  {speed}", refresh=False)
            self.bar.update(step - self.bar.n)
        else:
            left = (self.total - step) / self.steps_per_second if self.steps_per_second else 0.0
            log.info(
                "step %d/%d  loss %.4f  lr %.3g  grad_norm %.3g  %s samples/s%s%s%s  elapsed %s  left ~%s",
                step,
                self.total,
                loss,
                record["lr"],
                grad_norm,
                f"{self.samples_per_second:,.0f}",
                tokens,
                memory,
                mfu,
                clock(now - self.started),
                clock(left),
            )

    def close(self, step: int, excluded: float) -> tuple[float, int]:
        """``step``: where the run ended (a signal may stop it between log steps): the bar shows it. Returns the
        seconds spent training and the samples trained, from the end of the first step (unless it was the only one)."""
        self.bar.update(step - self.bar.n)
        self.bar.close()
        step_from, time_from, excluded_from = self.timed_from
        if step == step_from:  # the first step was the only one: timed with its start-up
            step_from, time_from, excluded_from = self.first_step, self.started, 0.0
        seconds = time.perf_counter() - time_from - (excluded - excluded_from)
        return seconds, (step - step_from) * self.samples_per_step


def summarize(summary: dict[str, Any], out_dir: Path) -> None:
    best = summary["best_metric"]
    log.info(
        "done: %d steps in %.1fs (%s samples/s while training)",
        summary["step"],
        summary["seconds"],
        f"{summary['samples_per_second']:,.0f}",
    )
    if best is not None:
        log.info("best %s: %.4f at step %d", summary["monitor"], best, summary["best_step"])
    files = [out_dir / name for name in ("best.pt", "last.pt", "metrics.jsonl") if (out_dir / name).exists()]
    log.info("files: %s", "  ".join(str(path) for path in files))
