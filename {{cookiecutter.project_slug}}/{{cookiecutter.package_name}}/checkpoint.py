"""Essential 6 (the saving half): crash-safe checkpoints, and what they hold.

A checkpoint is written to a temporary file in the same folder, flushed to
disk (fsync), then renamed over the old one with ``os.replace``, which is
atomic: a crash at any moment leaves either the old file or the new one,
never half of one. Checkpoints hold tensors, numbers, strings, lists and
dicts only, so ``torch.load(path, weights_only=True)`` reads them.

``save_training`` writes everything a run needs to continue exactly (model,
optimizer, schedule, GradScaler, data position, every RNG stream, the config
and the loop's own counters in a ``RunState``); ``restore_training`` puts it
back and returns the ``RunState``.

With ``parallel=fsdp`` the run's latest state is a sharded checkpoint instead,
the folder ``out_dir/last``: each process writes its own shards of the model
and optimizer (torch.distributed.checkpoint) into ``last/step-N``, rank 0 adds
``train_state.pt`` (the rest), and only then points ``last/latest`` at it. A
crash before that leaves the previous step's checkpoint as the one that counts.
It resumes on any number of processes: each reads the parts of the shards it
needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from .config import Config, to_dict
from .distributed import Dist
from .loader import BatchStream
from .schedule import Schedule
from .seed import rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)

# v2: the optimizer's state keyed by parameter name (torch.distributed.checkpoint.state_dict), whole.
FORMAT = "{{ cookiecutter.package_name }}-checkpoint-v2"
# The same state, gathered whole on rank 0 in CPU memory, whether the model is plain, DDP, compiled or FSDP.
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "config", "step", "best_metric")
LATEST = "latest"  # in a sharded checkpoint's folder: the name of its newest complete step folder


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the cause."""


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_old(path: Path) -> int | None:
    """A read handle on the file about to be replaced (POSIX only: Windows cannot rename over an open file)."""
    if os.name != "posix":
        return None
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(temp_path)`` for a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    old = None
    try:
        write(tmp)  # by path: torch.save then uses its fast native writer
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it private (0600); like any file the user writes
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        # Freeing the old file's disk blocks takes about 1 ms per 5 MB (ext4); holding it open
        # moves that work to the last close, done below off the calling thread.
        old = _open_old(path)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        if old is not None:
            threading.Thread(target=os.close, args=(old,), name="release-old-checkpoint", daemon=True).start()
    _fsync_dir(path.parent)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    try:
        atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))
    except OSError as e:
        raise CheckpointError(f"could not save {path}: {e.strerror or e}; the previous file is unchanged") from e
    except RuntimeError as e:  # torch.save's writer reports a full disk this way
        cause = _first_line(e)
        raise CheckpointError(
            f"could not save {path}: writing failed (is the disk full?): {cause}; the previous file is unchanged"
        ) from e


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (torch's can run to pages), or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint of this project, or raise CheckpointError saying what is wrong."""
    path = Path(path)
    if path.is_dir() and (path / LATEST).exists():
        return read_sharded(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file (a run's out_dir holds best.pt and last.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # what torch.save writes; torch's own errors for anything else are cryptic
        raise CheckpointError(f"checkpoint {path} is unreadable: not a whole torch.save file (truncated or corrupt?)")
    try:
        # mmap: tensors are read from the file as needed, not a whole copy in each rank's memory. Not on
        # Windows, which cannot replace a file that is mapped (the next save renames over it).
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=os.name != "nt")
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint {path} is refused: it holds Python objects besides tensors, numbers and strings (a pickled "
            "model?), and this project loads checkpoints with weights_only=True, which never runs code from a file"
        ) from None
    except Exception:  # torch raises many types for a damaged archive
        raise CheckpointError(f"checkpoint {path} is unreadable: a damaged torch.save file (corrupt?)") from None
    if isinstance(state, dict) and state.get("format") == FORMAT.replace("-v2", "-v1"):
        raise CheckpointError(
            f"checkpoint {path} was saved by an older version of this project (format v1, optimizer state by "
            "position); resume it with the version that wrote it, or start fresh from its weights"
        )
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected format '{FORMAT}')")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state


def load_resume_checkpoint(path: Path | None, ctx: Dist) -> dict[str, Any] | None:
    """The checkpoint every rank resumes from (rank 0 chose it), read on each rank; all fail if one cannot read it."""
    saved, error = None, None
    if path is not None:
        try:
            saved = load_checkpoint(path)
        except CheckpointError as e:
            shared = "; rank 0 resumes from it, so every node needs the same out_dir (a shared filesystem)"
            error = CheckpointError(f"{e}{shared if ctx.enabled and not ctx.is_main else ''}")
    if ctx.agree_max(error is not None):
        raise error or CheckpointError(f"another process could not read {path}; its message says why")
    return saved


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load weights into ``model``; a shape or key mismatch names the first differences."""
    own = unwrap(model).state_dict()
    problems = [f"missing {k}" for k in own if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in own]
    problems += [
        f"{k} is {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the model"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"checkpoint {path} does not fit the model built from the config: {'; '.join(problems[:3])}{more}"
        )
    unwrap(model).load_state_dict(state_dict)


def load_weights(model: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """A checkpoint's weights into the (unwrapped) model, from a file or a sharded folder."""
    if "sharded" in state:
        load_sharded(state["sharded"], model)
    else:
        load_model_state(model, state["model"], path)


@dataclass
class RunState:
    """Where the run stands: the loop's own counters, saved in every checkpoint and restored on resume."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    best_metric: float | None = None  # the best value of cfg.monitor so far
    best_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation
    bad_streak: int = 0  # consecutive steps with a non-finite loss or gradient
    skipped_total: int = 0  # optimizer steps skipped for non-finite gradients
    unlogged: list[list[float]] = field(default_factory=list)  # [step, loss, grad_norm, skipped, bad] rows
    eval_due: bool = False  # a stop request cut this step's evaluation short: a resumed run does it first
    evals_since_best: int = 0  # evaluations since monitor last improved (early stopping, cfg.patience)
    tracker_run_id: str = ""  # the W&B or MLflow run this run logs to (cfg.tracker), continued on resume


def save_training(
    path: Path, cfg: Config, ctx: Dist, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Schedule,
    scaler: torch.amp.GradScaler, batches: BatchStream, run: RunState,
) -> None:  # fmt: skip
    """Write everything needed to continue exactly. Every rank calls it; rank 0 writes. With parallel=fsdp,
    last.pt becomes the sharded folder ``last`` (see the top of this file): every rank writes its shards."""
    sharded = path.name == "last.pt" and cfg.parallel == "fsdp"
    rng = ctx.gather(rng_state())  # every rank's random streams; a collective
    if sharded:
        path = path.with_name("last")
        model_state, optimizer_state = {}, {}  # written by save_sharded, shard by shard
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer, options=WHOLE)  # FSDP: gathers the shards
    error = None
    if ctx.is_main or sharded:
        state = {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),  # {} unless fp16
            "config": to_dict(cfg),
            "step": run.step,
            "best_metric": run.best_metric,
            "metrics": run.metrics,
            "progress": {
                "data": batches.state_dict(cfg.batch_size * ctx.world_size),
                "best_step": run.best_step,
                "bad_streak": run.bad_streak,
                "skipped_total": run.skipped_total,
                "unlogged_steps": run.unlogged,
                "eval_due": run.eval_due,
                "evals_since_best": run.evals_since_best,
                "tracker_run_id": run.tracker_run_id,
            },
            "rng": rng,
        }
        try:
            if sharded:
                save_sharded(path, state, ctx, model, optimizer)
            else:
                save_checkpoint(state, path)
        except CheckpointError as e:
            error = e
    if ctx.agree_max(error is not None):  # every rank stops when one could not save
        raise error or CheckpointError(f"another process could not save {path}; its message says why")
    if ctx.is_main and path.name in ("last", "last.pt"):  # one latest state: the other kind (parallel changed) goes
        remove(path.with_name("last.pt" if sharded else "last"))


def remove(path: Path) -> None:
    """Delete a file, or a folder (a sharded checkpoint) with what it holds; nothing if there is none."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def save_sharded(
    folder: Path, state: dict[str, Any], ctx: Dist, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Every rank writes its shards into ``folder/step-N``, rank 0 adds the rest, then commits it (``latest``)."""
    step_folder = folder / f"step-{state['step']:08d}"
    shards = get_state_dict(model, optimizer)  # this rank's part (whole, in one process)
    if ctx.is_main:  # what a crash left uncommitted at this step, before a resume
        shutil.rmtree(step_folder, ignore_errors=True)
    ctx.barrier()
    error = None
    try:
        with _one_process_is_intended():
            dcp.save({"model": shards[0], "optimizer": shards[1]}, checkpoint_id=step_folder, no_dist=not ctx.enabled)
    except (OSError, RuntimeError, CheckpointException) as e:
        error = CheckpointError(f"could not save {step_folder}: {_first_line(e)}; {folder / LATEST} names the good one")
    if ctx.agree_max(error is not None):  # every rank's shards are written, or every rank stops
        raise error or CheckpointError(f"another process could not save its shards into {step_folder}")
    if ctx.is_main:
        save_checkpoint({**state, "model": {}, "optimizer": {}}, step_folder / "train_state.pt")
        atomic_write(folder / LATEST, lambda tmp: Path(tmp).write_text(step_folder.name + "\n"))  # the commit
        for old in folder.glob("step-*"):
            if old != step_folder:
                shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _one_process_is_intended() -> Iterator[None]:
    """torch.distributed.checkpoint warns when used without a process group, as in one process: it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_sharded(folder: Path) -> dict[str, Any]:
    """A sharded checkpoint's state except the shards (see ``load_sharded``), with ``sharded``: its step folder."""
    try:
        step_folder = folder / (folder / LATEST).read_text().strip()
    except OSError as e:
        raise CheckpointError(f"checkpoint {folder} is unreadable: {e.strerror}") from None
    state = load_checkpoint(step_folder / "train_state.pt")
    return {**state, "sharded": str(step_folder)}


def load_sharded(step_folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Read the shards this process needs into ``model`` (and ``optimizer``), however the saving run was split."""
    model_state, optimizer_state = get_state_dict(model, optimizer) if optimizer else (model.state_dict(), None)
    wanted = {"model": model_state, **({"optimizer": optimizer_state} if optimizer else {})}
    try:
        alone = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        with _one_process_is_intended():
            dcp.load(wanted, checkpoint_id=step_folder, no_dist=alone)
    except (OSError, RuntimeError, ValueError, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {step_folder} does not fit this model: {str(e).splitlines()[0]}") from None
    if optimizer is None:
        model.load_state_dict(model_state)
        return
    for saved, group in zip(optimizer_state["param_groups"], optimizer.param_groups, strict=True):
        saved.update({flag: group[flag] for flag in OPTIMIZER_FLAGS if flag in group})  # this machine's kernels
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def restore_training(
    saved: dict[str, Any], path: Path, cfg: Config, ctx: Dist, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Schedule, scaler: torch.amp.GradScaler, batches: BatchStream,
) -> RunState:  # fmt: skip
    """Put a checkpoint's optimizer, schedule, scaler, data position and RNG streams back; return its RunState.

    The model's weights are loaded before it is wrapped and moved (``load_model_state``).
    """
    try:
        if "sharded" in saved:  # model and optimizer, shard by shard
            load_sharded(saved["sharded"], model, optimizer)
        else:  # the model's weights were loaded before it was wrapped (load_model_state)
            load_optimizer_state(model, optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if saved["scaler"]:  # empty when saved without fp16: the new GradScaler starts fresh
            scaler.load_state_dict(saved["scaler"])
        progress = saved["progress"]
        batches.load_state_dict(progress["data"], cfg.batch_size * ctx.world_size)
        run = RunState(
            step=saved["step"],
            best_metric=saved["best_metric"],
            best_step=progress["best_step"],
            metrics=saved.get("metrics") or {},
            bad_streak=progress["bad_streak"],
            skipped_total=progress["skipped_total"],
            unlogged=progress["unlogged_steps"],
            eval_due=progress.get("eval_due", False),  # absent from older checkpoints
            evals_since_best=progress.get("evals_since_best", 0),
            tracker_run_id=progress.get("tracker_run_id", ""),
        )
        rng = saved["rng"]
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this run: {e}") from None
    if len(rng) == ctx.world_size:
        set_rng_state(rng[ctx.rank])
    else:  # another world size: fresh streams, still a function of the seed
        log.warning("resume: saved by %d process(es), now %d; random streams restart", len(rng), ctx.world_size)
        seed_everything(cfg.seed + ctx.rank + 1_000_003 * run.step)
    if run.step >= cfg.max_steps:
        log.warning("resume: %s is at step %d, and max_steps is %d: nothing to train (raise max_steps to go on)",
                    path, run.step, cfg.max_steps)  # fmt: skip
    return run


# How the optimizer runs on this device, not what it has learned: never taken from a checkpoint.
OPTIMIZER_FLAGS = ("fused", "foreach", "capturable")


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load moments and hyperparameters, keeping this optimizer's kernel flags.

    ``optimizer.load_state_dict`` would restore the saving machine's flags: a checkpoint written
    where AdamW ran ``foreach`` would switch a fused one off, or the reverse. The flags are set to
    this optimizer's before loading, so the state is also placed as its kernels expect. Under FSDP
    each rank keeps its own shard of the whole state.
    """
    groups = [
        {**saved_group, **{flag: group[flag] for flag in OPTIMIZER_FLAGS if flag in group}}
        for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=False)
    ]  # a different number of groups is reported by load_state_dict
    whole = {**saved, "param_groups": groups + saved["param_groups"][len(groups) :]}
    set_optimizer_state_dict(model, optimizer, whole, options=StateDictOptions(full_state_dict=True))
