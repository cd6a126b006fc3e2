"""``metrics.jsonl``: one JSON object per line, the run's source of truth (and TensorBoard, if asked)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..essentials.config import ConfigError
from .files import atomic_write


def require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "tensorboard=true needs the tensorboard package: pip install -e '.[tensorboard]' (or tensorboard=false)"
        ) from None


def tag(group: str, key: str) -> str:
    """A record's key as TensorBoard and trackers show it: ``val_acc`` as ``val/acc``, ``shifted/val_acc`` (a named
    validation set's) as ``val/shifted/acc``."""
    validation_set, _, metric = key.rpartition("/")
    return "/".join(filter(None, (group, validation_set, metric.removeprefix(group + "_"))))


class MetricsLog:
    """Appends records to ``metrics.jsonl``; ``enabled=False`` (every rank but 0 under torchrun) writes nothing."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self.tensorboard = None
        self.tracker = None  # trackers.WandbRun or MlflowRun: log(values, step), finish()

    def add_tensorboard(self, folder: Path, first_step: int) -> None:
        """Also write every number as a TensorBoard scalar, from ``first_step`` on: training records'
        under train/ (train/loss, train/lr...), evaluation records' under val/ (val_acc as val/acc; a named
        validation set's shifted/val_acc as val/shifted/acc)."""
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, TensorBoard drops what an interrupted run wrote past the checkpoint.
        self.tensorboard = SummaryWriter(str(folder), purge_step=first_step or None)

    def write(self, record: dict[str, Any], group: str) -> None:
        """Append ``record`` (with its ``step``); ``group``: train or val, its section in TensorBoard and trackers."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {
            tag(group, key): value for key, value in record.items() if key != "step" and isinstance(value, (int, float))
        }
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, record["step"])
        if self.tracker is not None:
            self.tracker.log(scalars, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.tracker is not None:
            self.tracker.finish()

    def truncate_after(self, step: int) -> None:
        """On resume: drop records past the checkpoint's step (they will be logged again) and any torn last line."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(kept)))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
