"""Experiment trackers, optional: Weights & Biases or MLflow, next to metrics.jsonl (which stays the truth).

    tracker=wandb    pip install -e '.[wandb]'   (wandb login, or WANDB_MODE=offline and `wandb sync` later)
    tracker=mlflow   pip install -e '.[mlflow]'  (MLFLOW_TRACKING_URI: a server, or a local store)

Rank 0 alone logs, the same numbers as metrics.jsonl, under train/ and val/ as in TensorBoard. The
tracker's run id is saved in every checkpoint, so a resumed run continues the same tracker run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..essentials.config import Config, ConfigError, flatten, to_dict


class TrackerError(RuntimeError):
    """The tracker could not start (not logged in, server unreachable); exit code 1."""


def require_tracker(cfg: Config) -> None:
    """Before anything is written: the tracker's package is installed."""
    if cfg.tracker != "none" and importlib.util.find_spec(cfg.tracker) is None:
        name = cfg.tracker
        raise ConfigError(f"tracker={name} needs the {name} package: pip install -e '.[{name}]' (or tracker=none)")


class WandbRun:
    def __init__(self, cfg: Config, run_id: str, folder: Path):
        import wandb

        # resume="allow": the run of that id continues (W&B keeps the steps it already has; metrics.jsonl
        # drops those past the checkpoint and logs them again).
        self.run = wandb.init(
            project=cfg.tracker_project,
            dir=str(folder),
            config=to_dict(cfg),
            id=run_id or None,
            resume="allow" if run_id else None,
        )
        self.run_id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self) -> None:
        self.run.finish()


class MlflowRun:
    def __init__(self, cfg: Config, run_id: str, folder: Path):
        import mlflow

        if run_id:
            self.run = mlflow.start_run(run_id=run_id)
        else:
            mlflow.set_experiment(cfg.tracker_project)
            self.run = mlflow.start_run(run_name=folder.name)
            mlflow.log_params(flatten(to_dict(cfg)))  # once: MLflow refuses a parameter logged again with another value
        self.run_id = self.run.info.run_id
        self.mlflow = mlflow

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def finish(self) -> None:
        self.mlflow.end_run()


def start_tracker(cfg: Config, run_id: str, folder: Path) -> Any:
    """The tracker run for ``cfg.tracker``: run ``run_id`` continued, or a new one ("")."""
    try:
        if cfg.tracker == "wandb":
            return WandbRun(cfg, run_id, folder)
        return MlflowRun(cfg, run_id, folder)
    except Exception as e:  # whatever the tracker raises (no login, no server): one line, not its traceback
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackerError(f"tracker={cfg.tracker} could not start: {message}") from None
