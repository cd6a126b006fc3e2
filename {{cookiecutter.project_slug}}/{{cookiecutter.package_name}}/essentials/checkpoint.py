"""Essential 6 (the saving half): crash-safe checkpoints of the state of a run.

A checkpoint is written to a temporary file in the same folder, flushed to
disk (fsync), then renamed over the old one with ``os.replace``, which is
atomic (files.py): a crash at any moment leaves either the old file or the new
one, never half of one. Checkpoints hold tensors, numbers, strings, lists and
dicts only, so ``torch.load(path, weights_only=True)`` reads them.

``save_training(path, state, process)`` writes ``state.state_dict()`` (state.py:
everything a run needs to continue exactly) with every process's RNG streams;
``read_on_every_rank(path, process)`` reads one (before the run builds anything,
so that a checkpoint it cannot use stops every process at once), and
``restore_training(path, saved, state, process)`` puts it back.

With ``parallel=fsdp`` the run's latest state is a sharded checkpoint instead,
the folder ``out_dir/last``: each process writes its own shards of the model
and optimizer (torch.distributed.checkpoint) into ``last/step-N``, rank 0 adds
``train_state.pt`` (the rest of the same dict), and only then points
``last/latest`` at it. A crash before that leaves the previous step's
checkpoint as the one that counts. It resumes on any number of processes:
each reads the parts of the shards it needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import threading
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from ..machinery.files import atomic_write, remove
from .config import ConfigError
from .seed import rng_state, seed_everything, set_rng_state

if TYPE_CHECKING:  # the machinery imports the essentials' config, seed and precision: names only, for types
    from ..machinery.distributed import Process
    from ..machinery.state import TrainState

log = logging.getLogger(__name__)

# v3: the state of a run as TrainState.state_dict() gives it, its counters by name.
FORMAT = "{{ cookiecutter.package_name }}-checkpoint-v3"
REQUIRED_KEYS = ("config", "model")  # what evaluating and init_from read; resuming reads the rest (TrainState)
LATEST = "latest"  # in a sharded checkpoint's folder: the name of its newest complete step folder


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the cause."""


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
    """Read a checkpoint of this project (a file or a sharded folder), or raise CheckpointError saying what is wrong."""
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
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # what a changed byte leaves, not a class the file names
            raise CheckpointError(f"checkpoint {path} is unreadable: a damaged torch.save file (corrupt?)") from None
        raise CheckpointError(
            f"checkpoint {path} is refused: it holds Python objects besides tensors, numbers and strings (a pickled "
            "model?), and this project loads checkpoints with weights_only=True, which never runs code from a file"
        ) from None
    except Exception:  # torch raises many types for a damaged archive
        raise CheckpointError(f"checkpoint {path} is unreadable: a damaged torch.save file (corrupt?)") from None
    version = str(state.get("format", "")) if isinstance(state, dict) else ""
    if version.rpartition("-")[0] == FORMAT.rpartition("-")[0] and version != FORMAT:  # this project, another format
        raise CheckpointError(
            f"checkpoint {path} was saved by another version of this project (format {version.rpartition('-')[2]}; "
            f"this one reads {FORMAT.rpartition('-')[2]}): resume or evaluate it with the version that wrote it"
        )
    if version != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected format '{FORMAT}')")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state


def read_on_every_rank(path: Path | None, process: Process) -> dict[str, Any] | None:
    """The checkpoint every rank starts from (rank 0 chose it), read on each rank; all fail if one cannot read it.
    None for no path."""
    saved, error = None, None
    try:
        saved = load_checkpoint(path) if path is not None else None
    except CheckpointError as e:
        shared = "; rank 0 resumes from it, so every node needs the same out_dir (a shared filesystem)"
        error = CheckpointError(f"{e}{shared if process.has_peers and not process.is_main else ''}")
    if process.agree_max(error is not None):
        raise error or CheckpointError(f"another process could not read {path}; its message says why")
    return saved


def check_fits(model: nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """A whole checkpoint's weights against ``model``: a shape or key mismatch names the first differences."""
    own = get_model_state_dict(model)  # by plain names, whatever wraps the model (FSDP: shards of the full shape)
    problems = [f"missing {k}" for k in own if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in own]
    problems += [
        f"{k} is {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the model"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"checkpoint {path} does not fit the model built from the config: {'; '.join(problems[:3])}{more}"
        )


def load_weights(model: nn.Module, saved: dict[str, Any], path: str | Path) -> None:
    """A checkpoint's weights alone into ``model`` (plain, DDP, FSDP or compiled), from a file or a sharded folder:
    their moving average where it holds one (ema_decay: last's ``ema``; best.pt and snapshots hold it as ``model``)."""
    if "sharded" in saved:
        weights = get_model_state_dict(model)
        load_shards(saved["sharded"], {"model": weights})
        if "ema" in saved:  # the average's parameters over the weights just read (buffers stay)
            load_shards(saved["sharded"], {"ema": {name: weights[name] for name in saved["ema"]}})
    else:
        check_fits(model, saved["model"], path)
        weights = {**saved["model"], **saved.get("ema", {})}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))  # as TrainState loads


def save_training(path: Path, state: TrainState, process: Process, with_optimizer: bool = True) -> None:
    """Write ``state`` and every rank's RNG streams to ``path``: one file (``*.pt``), written by rank 0, or a
    folder of shards, written by every rank (parallel=fsdp's ``last``; see the top of this file). Every rank
    calls it; if one cannot save, all raise CheckpointError and the previous checkpoint is left as it was."""
    sharded = path.suffix != ".pt"
    saved = training_checkpoint(state, process, sharded, with_optimizer)
    error = None
    if process.is_main or sharded:
        try:
            save_sharded(path, saved, process) if sharded else save_checkpoint(saved, path)
        except CheckpointError as e:
            error = e
    agree_on_save(path, error, process)


def training_checkpoint(state: TrainState, process: Process, sharded: bool, with_optimizer: bool) -> dict[str, Any]:
    """What a checkpoint of ``state`` holds, every rank's RNG streams included (rank 0 writes them)."""
    state_now = state.state_dict(whole=not sharded, with_optimizer=with_optimizer)
    return {"format": FORMAT, **state_now, "rng": process.gather_on_main(rng_state())}


def agree_on_save(path: Path, error: CheckpointError | None, process: Process) -> None:
    """Every rank raises when one could not save ``path``; after a save of last, the other kind of last goes."""
    if process.agree_max(error is not None):
        raise error or CheckpointError(f"another process could not save {path}; its message says why")
    if process.is_main and path.stem == "last":  # one latest state: the other kind (parallel changed) goes
        remove(path.with_name("last" if path.suffix == ".pt" else "last.pt"))


class LastCheckpoint:
    """The run's latest state, ``last``, saved every ``ckpt_every`` steps and when the run stops.

    With ``async_save`` (the default), ``last`` is written in the background: the step waits only while the
    state is copied to host memory (pinned, from a GPU), then a thread writes it while training goes on. One
    write at most is in flight: the next save, and the end of the run whichever way it ends (a stop request, an
    error), wait for it first. The commit is the same as in the foreground: ``last.pt``'s rename, or
    parallel=fsdp's ``latest``, written by rank 0 once every rank's shards are (DCP's ``async_save``, its
    collectives on a gloo group of their own), so a crash during a write leaves the previous ``last`` whole."""

    def __init__(self, path: Path, process: Process, in_background: bool):
        self.sharded = path.suffix != ".pt"
        # A sharded save in one process (parallel=fsdp alone: a test, a debug run) stays in the foreground: DCP
        # warns in its thread there, where no warnings filter of this thread reaches.
        self.path, self.process = path, process
        self.in_background = in_background and (process.has_peers or not self.sharded)
        self.writing: threading.Thread | Future | None = None
        self.error: CheckpointError | None = None

    def save(self, state: TrainState) -> None:
        """Every rank calls it."""
        self.wait()
        if not self.in_background:
            save_training(self.path, state, self.process)
            return
        saved = training_checkpoint(state, self.process, sharded=self.sharded, with_optimizer=True)
        if self.sharded:  # DCP copies the shards to host memory, then writes them in a thread of its own
            self.writing = save_sharded(self.path, saved, self.process, in_background=True)
        elif self.process.is_main:
            snapshot = on_host(saved)  # all the step waits for: training may change the originals from here
            self.writing = threading.Thread(target=self._write, args=(snapshot,), name="save-last")
            self.writing.start()

    def _write(self, snapshot: dict[str, Any]) -> None:
        try:
            save_checkpoint(snapshot, self.path)
        except CheckpointError as e:
            self.error = e  # raised on every rank at the next wait

    def wait(self) -> None:
        """Until the write in flight is committed; every rank raises CheckpointError when one could not write."""
        if isinstance(self.writing, threading.Thread):
            self.writing.join()
        elif self.writing is not None:
            try:
                self.writing.result()  # DCP's errors (every rank's), and the commit's
            except (OSError, RuntimeError, CheckpointException) as e:
                self.error = CheckpointError(
                    f"could not save {self.path}: {_first_line(e)}; its latest names the good one"
                )
        self.writing = None
        if self.in_background:
            error, self.error = self.error, None
            agree_on_save(self.path, error, self.process)

    @contextlib.contextmanager
    def committed_at_exit(self) -> Iterator[None]:
        """On the way out of the run, whichever way, the write in flight is committed first."""
        try:
            yield
        except BaseException:
            if isinstance(self.writing, threading.Thread):  # an error: no agreement now (a rank may be gone)
                self.writing.join()
            raise
        self.wait()


def on_host(value: Any) -> Any:
    """A copy of ``value`` (a checkpoint: dicts, lists, tensors, numbers) whose tensors are in host memory: from a
    GPU into pinned memory without blocking, then one wait for the copies; on the CPU, clones."""
    devices = set()

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.device.type == "cpu":
                return value.clone()
            if value.device.type != "cuda":
                return value.to("cpu")
            devices.add(value.device)
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            return host.copy_(value, non_blocking=True)
        if isinstance(value, dict):
            return {key: copy(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(item) for item in value)
        return value

    copied = copy(value)
    for device in devices:
        torch.cuda.synchronize(device)  # the copies are done before another thread reads them
    return copied


def save_best(path: Path, state: TrainState, process: Process) -> None:
    """best.pt, for evaluation and init_from: the weights evaluation measured (ema_decay: their average). Under
    FSDP without the optimizer's state: rank 0 would gather it whole (8 bytes a parameter with AdamW) only to
    leave it unread; nor with the average, which no run can continue from. Every rank calls it."""
    weights_only = (process.has_peers and state.cfg.parallel == "fsdp") or bool(state.ema.average)
    with state.ema.swapped_in():
        save_training(path, state, process, with_optimizer=not weights_only)


def save_snapshot(out_dir: Path, state: TrainState, process: Process) -> Path:
    """keep_every: ``out_dir/snapshots/step-N.pt``, the weights at this step (and the config and metrics, as
    ``best.pt`` holds them: ``evaluate``, ``export`` and ``init_from`` read it), never replaced or deleted by the
    loop. Under FSDP the weights are gathered on rank 0. Every rank calls it."""
    path = out_dir / "snapshots" / f"step-{state.step:08d}.pt"
    if process.is_main:
        path.parent.mkdir(exist_ok=True)
    with state.ema.swapped_in():  # ema_decay: the average, as best.pt
        save_training(path, state, process, with_optimizer=False)
    return path


def restore_training(path: Path, saved: dict[str, Any], state: TrainState, process: Process) -> None:
    """Put the checkpoint read from ``path`` (``read_on_every_rank``: a file or a sharded folder) back into
    ``state``, and this rank's RNG streams. Every rank calls it."""
    if "optimizer" not in saved:
        raise CheckpointError(
            f"checkpoint {path} holds weights only (a best.pt of an fsdp run or with ema_decay, or a snapshot): "
            f"resume from the run's last, "
            f"or start from these weights with init_from={path}"
        )
    try:
        if "sharded" in saved:  # this process's shards of the model and optimizer, read from the saved ones
            shards = state.state_dict(whole=False)
            if "ema" not in saved:  # saved without ema_decay: the average starts from the weights
                shards.pop("ema", None)
            load_shards(saved["sharded"], shards)
            state.load_state_dict(
                {**saved, **{key: shards[key] for key in ("model", "optimizer", "ema") if key in shards}}
            )
        else:
            check_fits(state.model, saved["model"], path)
            state.load_state_dict(saved)
    except (CheckpointError, ConfigError):
        raise  # already one line saying what does not fit
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this run: {e}") from None
    rng = saved["rng"]
    if len(rng) == process.world_size:
        set_rng_state(rng[process.rank])
    else:  # another world size: fresh streams, still a function of the seed; and maybe another global batch
        then = saved["config"]["batch_size"] * saved["config"]["accum_steps"] * len(rng)
        now = state.cfg.batch_size * state.cfg.accum_steps * process.world_size
        keep = "" if now == then else " (batch_size or accum_steps keep it)"
        log.warning(
            "resume: saved by %d process(es), now %d; random streams restart; %d samples per optimizer "
            "step then, %d now%s",
            len(rng),
            process.world_size,
            then,
            now,
            keep,
        )
        seed_everything(state.cfg.seed + process.rank + 1_000_003 * state.step)
    if state.step >= state.cfg.max_steps:
        log.warning(
            "resume: %s is at step %d, and max_steps is %d: nothing to train (raise max_steps to go on)",
            path,
            state.step,
            state.cfg.max_steps,
        )


def save_sharded(folder: Path, saved: dict[str, Any], process: Process, in_background: bool = False) -> Future | None:
    """Every rank writes its shards into ``folder/step-N``, rank 0 adds the rest, then commits it (``latest``).
    ``in_background``: the shards are copied to host memory, and written, then committed, in a thread: the
    returned future is done when they are (on rank 0, committed)."""
    step_folder = folder / f"step-{saved['step']:08d}"
    if process.is_main:  # what a crash left uncommitted at this step, before a resume
        shutil.rmtree(step_folder, ignore_errors=True)
    process.barrier()
    shards = {key: saved[key] for key in ("model", "optimizer", "ema") if key in saved}
    # The rest: all but the shards; the average's names stay (evaluate and export read the average by name).
    names = {"ema": dict.fromkeys(saved["ema"])} if "ema" in saved else {}
    rest = on_host({**saved, "model": {}, "optimizer": {}, **names}) if process.is_main else None
    if in_background:
        with _one_process_is_intended():
            written = dcp.async_save(shards, checkpoint_id=step_folder, process_group=process.saves,
                                     no_dist=not process.has_peers)  # fmt: skip
        committed: Future = Future()

        def commit(written: Future) -> None:
            try:
                written.result()
                if rest is not None:
                    commit_sharded(folder, step_folder, rest)
                committed.set_result(None)
            except BaseException as e:  # handed to whoever waits for the future
                committed.set_exception(e)

        written.add_done_callback(commit)
        return committed
    error = None
    try:
        with _one_process_is_intended():
            dcp.save(shards, checkpoint_id=step_folder, no_dist=not process.has_peers)
    except (OSError, RuntimeError, CheckpointException) as e:
        error = CheckpointError(f"could not save {step_folder}: {_first_line(e)}; {folder / LATEST} names the good one")
    if process.agree_max(error is not None):  # every rank's shards are written, or every rank stops
        raise error or CheckpointError(f"another process could not save its shards into {step_folder}")
    if rest is not None:
        commit_sharded(folder, step_folder, rest)
    return None


def commit_sharded(folder: Path, step_folder: Path, rest: dict[str, Any]) -> None:
    """Rank 0, once every rank's shards are written: the rest of the state, then ``latest`` names the step."""
    save_checkpoint(rest, step_folder / "train_state.pt")
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
    """A sharded checkpoint's state except the shards (see ``load_shards``), with ``sharded``: its step folder."""
    try:
        step_folder = folder / (folder / LATEST).read_text().strip()
    except OSError as e:
        raise CheckpointError(f"checkpoint {folder} is unreadable: {e.strerror}") from None
    state = load_checkpoint(step_folder / "train_state.pt")
    return {**state, "sharded": str(step_folder)}


def load_shards(step_folder: str | Path, wanted: dict[str, Any]) -> None:
    """Fill ``wanted`` (``{"model": ..., "optimizer": ...}``, this process's parts) from a sharded checkpoint,
    however the saving run was split."""
    try:
        alone = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        with _one_process_is_intended():
            dcp.load(
                {key: wanted[key] for key in ("model", "optimizer", "ema") if key in wanted},
                checkpoint_id=step_folder,
                no_dist=alone,
            )
    except (OSError, RuntimeError, ValueError, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {step_folder} does not fit this model: {str(e).splitlines()[0]}") from None
