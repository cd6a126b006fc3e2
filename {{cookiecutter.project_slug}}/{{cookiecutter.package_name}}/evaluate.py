"""Evaluate a saved checkpoint: ``python -m {{ cookiecutter.package_name }}.evaluate --checkpoint OUT_DIR/best.pt``.

It rebuilds the model and data from the checkpoint's own config (plus key=value
overrides) and runs the loop's own evaluation (essentials/validation.py), so it
reproduces the metrics recorded when the checkpoint was saved.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from .data import build_datasets
from .essentials.checkpoint import CheckpointError, load_checkpoint, load_weights
from .essentials.config import ConfigError, apply_overrides, config_from_dict, parse_overrides, validate
from .essentials.precision import resolve_device, resolve_precision
from .essentials.validation import evaluate_sets
from .machinery.distributed import Process
from .machinery.loader import build_loaders, workers_ended
from .model import build_model

log = logging.getLogger(__name__)


def evaluate_checkpoint(path: str | Path, overrides: list[str] | None = None) -> dict[str, float]:
    return evaluate_state(load_checkpoint(path), path, overrides)


def evaluate_state(state: dict, path: str | Path, overrides: list[str] | None = None) -> dict[str, float]:
    """Rebuild model and data from a loaded checkpoint's config (plus overrides) and evaluate it."""
    cfg = config_from_dict(state["config"], source=str(path))
    apply_overrides(cfg, parse_overrides(overrides or []))
    validate(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model = build_model(cfg)
    load_weights(model, state, path)  # a file, or parallel=fsdp's sharded last, read whole into this process
    model.to(device)
    train_set, val_sets = build_datasets(cfg)
    _, val_loaders = build_loaders(cfg, train_set, val_sets, Process(device=device))
    with workers_ended(*val_loaders.values()):  # after an error too (machinery/loader.py)
        return evaluate_sets(model, val_loaders, device, precision, cfg.task)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m {{ cookiecutter.package_name }}.evaluate",
        description="Evaluate a saved checkpoint on the validation set with the checkpoint's own config.",
    )
    parser.add_argument("--checkpoint", required=True, help="path to best.pt or last.pt")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config changes, e.g. device=cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        state = load_checkpoint(args.checkpoint)
        metrics = evaluate_state(state, args.checkpoint, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # the same status as train's for a checkpoint it cannot use
        print(f"error: {e}", file=sys.stderr)
        return 1
    recorded = state.get("metrics") or {}
    for name, value in metrics.items():
        saved = f"  (recorded at save: {recorded[name]:.6f})" if name in recorded else ""
        print(f"{name}: {value:.6f}{saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
