"""The run's folder, ``out_dir``: what a run starts from, what it writes there first, and what it leaves at the end.

Before anything is written: a fresh start is refused in a folder that already
holds a run (unless ``overwrite=true``), and rank 0 decides what to resume
(``resume``) or initialise (``init_from``) from. Then rank 0 writes
``config.yaml``, starts (or cuts back, on resume) ``metrics.jsonl`` and starts
the tracker. A run stopped by a signal or ``max_time_minutes`` leaves the
marker file ``stopped_by_signal`` for a requeue script; the end summary says
where everything is.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..essentials.config import Config, ConfigError, differences, dump_yaml, to_dict
from ..essentials.schedule import cooldown_start, decay_horizon
from .distributed import Process
from .files import remove
from .metrics import MetricsLog, require_tensorboard
from .progress import summarize
from .signals import TIME_LIMIT, exit_status
from .state import TrainingError, TrainState
from .trackers import TrackerError, require_tracker, start_tracker

log = logging.getLogger(__name__)

RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "last", "best.pt", "snapshots")  # last: fsdp's, a folder
# Written when a signal or max_time_minutes stopped the run (after last.pt), removed when it starts again:
# torchrun exits 1 when its processes exit 143 or 124, so a requeue script looks for this file
# (docs/resume.md).
STOPPED_MARKER = "stopped_by_signal"
# Changing these on resume is harmless; any other difference is reported as one
# that makes the resumed run differ from an uninterrupted one.
SAFE_ON_RESUME = {
    *("eval_every", "log_every", "ckpt_every", "out_dir", "num_workers", "num_threads", "device"),
    *("max_bad_steps", "dist_timeout_minutes", "progress", "tensorboard", "compile", "tf32", "max_time_minutes"),
    *("async_save", "activation_checkpointing", "keep_every"),
}


@contextlib.contextmanager
def one_run_per_folder(cfg: Config, process: Process) -> Iterator[None]:
    """Rank 0 holds an OS lock on ``out_dir/.lock`` while the run lives, so that a second start there (another
    ``resume=auto``, an ``overwrite=true``) is refused at once on every rank, naming what holds it. The kernel
    releases the lock when the process ends, a ``kill -9`` included: it cannot go stale."""
    out_dir, held = Path(cfg.out_dir), []
    existed = out_dir.is_dir()
    process.decided_by_main(lambda: held.extend(take_lock(out_dir)))
    try:
        yield
    finally:
        for file in held:
            if [path.name for path in out_dir.iterdir()] == [".lock"]:  # a start refused before writing anything
                (out_dir / ".lock").unlink()
                if not existed:
                    out_dir.rmdir()
            file.close()  # closing it releases the lock


def take_lock(out_dir: Path) -> list[IO[str]]:
    """The open, locked lock file of ``out_dir`` ([] where out_dir cannot be written: the run says so later)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        file = open(out_dir / ".lock", "a+")  # held open for the run's life: closing it releases the lock
    except OSError:
        return []
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "another process"
        file.close()
        message = f"out_dir {out_dir} is in use by another run ({holder})"
        raise ConfigError(f"{message}: wait for it to end, stop it, or use another out_dir") from None
    file.truncate(0)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
    file.flush()
    return [file]


def latest_checkpoint(cfg: Config) -> Path:
    """Where the run's latest state goes: last.pt, or with parallel=fsdp the sharded folder last."""
    return Path(cfg.out_dir) / ("last" if cfg.parallel == "fsdp" else "last.pt")


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


def choose_start(cfg: Config, process: Process) -> tuple[Path | None, Path | None]:
    """(the checkpoint to resume from, the one to take initial weights from), each None or a path; checked
    before anything is written. Rank 0 decides (nodes may have disks of their own); every rank follows."""
    if cfg.tensorboard:
        require_tensorboard()
    require_tracker(cfg)
    resume_from = process.decided_by_main(lambda: resume_checkpoint_path(cfg))
    check_out_dir(cfg, resume_from)
    # Fine-tuning (init_from): a fresh run that starts from another run's weights; a resumed run ignores it.
    init_from = process.decided_by_main(lambda: init_from_path(cfg)) if resume_from is None else None
    return resume_from, init_from


def report_config_changes(saved: dict[str, Any], cfg: Config, path: Path, step: int) -> None:
    """Log what differs between the checkpoint's config (``saved``, at ``step``) and this run's, and what follows."""
    changes = differences(saved, to_dict(cfg))
    for key in ("resume", "overwrite"):  # how this run was started, not what it trains
        changes.pop(key, None)
    saved_horizon = saved.get("decay_steps") or saved["max_steps"]
    for key, (old, new) in changes.items():
        note = ""
        if key in ("max_steps", "decay_steps"):  # safe unless they move the end of the lr schedule
            horizon = decay_horizon(cfg)
            if cfg.lr_schedule == "wsd" and saved.get("lr_schedule") == "wsd" and horizon != saved_horizon:
                note = extending_wsd(saved, cfg, step)
            elif cfg.lr_schedule != "step" and horizon != saved_horizon:
                note = f"  (the lr schedule now ends at step {horizon}, not {saved_horizon}: the resumed run will "
                note += f"differ from an uninterrupted one; decay_steps={saved_horizon} keeps it)"
        elif key not in SAFE_ON_RESUME:
            note = "  (the resumed run will differ from an uninterrupted one)"
        log.warning("resume: %s changed from %r to %r%s", key, old, new, note)
    if changes:
        log.info("resume: %d config change(s) against %s", len(changes), path)


def extending_wsd(saved: dict[str, Any], cfg: Config, step: int) -> str:
    """The note for a wsd run resumed at ``step`` with another end: an extension while it is still at its peak."""
    saved_start = (saved.get("decay_steps") or saved["max_steps"]) - saved.get("cooldown_steps", 0)
    if step <= saved_start and step <= cooldown_start(cfg):
        where = f"step {step} is before the cooldown, which now starts at step {cooldown_start(cfg)}"
        return f"  (wsd: {where}: the run goes on as if it had been asked for this length from the start)"
    return f"  (wsd: step {step} is in the cooldown begun at step {saved_start}: the resumed run will differ)"


def open_run_folder(state: TrainState, process: Process, resumed: bool) -> MetricsLog:
    """Rank 0 writes the run's folder (config.yaml; a fresh metrics.jsonl, or the resumed one cut at the
    checkpoint's step) and starts the tracker (continuing the checkpoint's tracker run)."""
    cfg, out_dir = state.cfg, Path(state.cfg.out_dir)
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", enabled=process.is_main)
    error = None
    if process.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            if not resumed:
                for name in RUN_FILES:  # only reached with overwrite=true, or an empty folder
                    remove(out_dir / name)
                for folder in ("tensorboard", "wandb"):
                    shutil.rmtree(out_dir / folder, ignore_errors=True)
            (out_dir / STOPPED_MARKER).unlink(missing_ok=True)
            (out_dir / "config.yaml").write_text(dump_yaml(cfg))
        except OSError as e:  # read-only, full, or not a folder: before anything is trained
            error = TrainingError(f"cannot write to out_dir {out_dir}: {e.strerror or e}; use one you can write to")
        if error is None and cfg.tensorboard:
            metrics_log.add_tensorboard(out_dir / "tensorboard", first_step=state.step)
        if error is None and resumed:
            metrics_log.truncate_after(state.step)
        if error is None and cfg.tracker != "none":
            try:
                metrics_log.tracker = start_tracker(cfg, state.tracker_run_id, out_dir)
                state.tracker_run_id = metrics_log.tracker.run_id
            except TrackerError as e:
                error = e
    # The other ranks only read what rank 0 wrote; they stop with it when its tracker could not start.
    if process.agree_max(error is not None):
        raise error or TrainingError("rank 0 could not open out_dir or start the tracker; its message says why")
    check_shared(out_dir, process)
    return metrics_log


def check_shared(out_dir: Path, process: Process) -> None:
    """Under torchrun, that every rank sees the out_dir rank 0 writes to, or every rank stops, saying so: rank 0
    alone writes last.pt, the stop marker and the commit of a sharded checkpoint, for every node."""
    if not process.has_peers:
        return
    token = process.decided_by_main(lambda: secrets.token_hex(8))
    check = out_dir / f".shared_check-{token}"  # a new name: no node has it cached as missing
    if process.is_main:
        check.write_text(token)
    process.barrier()
    seen = process.is_main or _reads(check, token)
    unseen_somewhere = process.agree_max(not seen)  # once every rank has looked
    if process.is_main:
        check.unlink()
    if unseen_somewhere and not seen:
        raise ConfigError(
            f"out_dir {out_dir} is not the folder rank 0 writes to (a disk of this node's own?): "
            "every node needs the same out_dir, on a shared filesystem"
        )
    if unseen_somewhere:
        raise ConfigError(f"another process cannot see out_dir {out_dir}; its message says why")


def _reads(path: Path, text: str, seconds: float = 5.0) -> bool:
    """Whether ``path`` holds ``text``, waiting up to ``seconds`` for a network filesystem to show it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if path.read_text() == text:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def announce_stop(state: TrainState, process: Process, stop_reason: int) -> None:
    """Say why the run ends before max_steps; after a signal or the time limit, also leave the marker a
    requeue script reads."""
    cfg = state.cfg
    if not stop_reason:
        log.warning(
            "early stop at step %d: %d evaluations without a better %s (patience=%d)",
            state.step,
            state.evals_since_best,
            cfg.monitor,
            cfg.patience,
        )
        return
    if stop_reason == TIME_LIMIT:
        why = f"time limit (max_time_minutes={cfg.max_time_minutes:g})"
    else:
        why = f"signal {stop_reason}"
    if process.is_main:
        (Path(cfg.out_dir) / STOPPED_MARKER).write_text(f"{why} at step {state.step}\n")
    log.warning(
        "stopped by %s at step %d; %s saved, resume with resume=auto", why, state.step, latest_checkpoint(cfg).name
    )


def finish(state: TrainState, seconds: float, train_seconds: float, samples: int, stop_reason: int) -> dict[str, Any]:
    """The run's summary: printed (the end block) and returned."""
    summary = {
        "step": state.step,
        "seconds": seconds,
        "train_seconds": train_seconds,
        "best_metric": state.best_metric,
        "best_step": state.best_step,
        "metrics": state.metrics,
        "skipped_steps": state.step_log.skipped_total,
        "stopped_by_signal": stop_reason if stop_reason not in (0, TIME_LIMIT) else None,
        "time_limit_reached": stop_reason == TIME_LIMIT,
        "exit_code": exit_status(stop_reason),
        "out_dir": str(Path(state.cfg.out_dir)),
        "monitor": state.cfg.monitor,
        "samples_per_second": samples / max(train_seconds, 1e-9),
    }
    summarize(summary, Path(state.cfg.out_dir))
    return summary
