"""Plot a run: ``python -m {{ cookiecutter.package_name }}.plot OUT_DIR`` writes OUT_DIR/curves.png.

From metrics.jsonl, against the optimizer step: the training loss (each point
the mean of its log interval, and a centred mean over a window of steps), one
panel per validation metric, whatever its name, with the best step of the
run's ``monitor`` marked, and the learning rate. Needs matplotlib:
``pip install -e '.[plot]'``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from .machinery.metrics import read_metrics
from .task import METRIC_GOALS


def centred_mean(steps: list[int], values: list[float], half_window: float) -> list[float]:
    """Each value replaced by the mean of those within ``half_window`` steps of it: smooth, and no lag."""
    out = []
    for step in steps:
        near = [v for s, v in zip(steps, values, strict=True) if abs(s - step) <= half_window]
        out.append(sum(near) / len(near))
    return out


def split_records(records: list[dict[str, Any]]) -> tuple[list[dict], list[dict], list[str]]:
    """(training records, evaluation records, validation metric names); training records carry the lr."""
    train = [r for r in records if "lr" in r]
    evals = [r for r in records if "lr" not in r]
    names = list(dict.fromkeys(k for r in evals for k in r if k != "step"))
    return train, evals, names


def best_step(evals: list[dict[str, Any]], out_dir: Path) -> tuple[str, int] | None:
    """(monitor, step of its best value), from the run's config.yaml and the goals task.py declares."""
    try:
        cfg = yaml.safe_load((out_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    monitor = cfg.get("monitor")
    goal = METRIC_GOALS.get(str(monitor).rpartition("/")[2])  # a named validation set's: SET/METRIC
    seen = [r for r in evals if isinstance(r.get(monitor), (int, float))]
    if not seen or goal is None:
        return None
    best = (min if goal == "min" else max)(seen, key=lambda r: r[monitor])
    return monitor, best["step"]


def plot(out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    train, evals, names = split_records(read_metrics(out_dir / "metrics.jsonl"))
    fig, axes = plt.subplots(
        2 + len(names), 1, sharex=True, figsize=(9, 3 + 2.5 * (1 + len(names))), constrained_layout=True, squeeze=False
    )
    loss_ax, *metric_axes, lr_ax = axes[:, 0]
    logged = [r for r in train if "loss" in r]
    steps, losses = [r["step"] for r in logged], [r["loss"] for r in logged]
    loss_ax.plot(steps, losses, color="tab:blue", alpha=0.35, label="train loss (mean of each log interval)")
    if steps:
        half_window = max(1, (steps[-1] - steps[0]) / 40)
        loss_ax.plot(
            steps,
            centred_mean(steps, losses, half_window),
            color="tab:blue",
            label=f"train loss (mean over ±{half_window:.0f} steps)",
        )
    loss_ax.set_ylabel("training loss")
    if losses and min(losses) > 0:
        loss_ax.set_yscale("log")
    for ax, name in zip(metric_axes, names, strict=True):
        ax.plot(
            [r["step"] for r in evals if name in r],
            [r[name] for r in evals if name in r],
            "o-",
            color="tab:orange",
            label=name,
        )
        ax.set_ylabel(name)
    lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    best = best_step(evals, out_dir)
    for ax in axes[:, 0]:
        if best is not None:
            ax.axvline(best[1], color="gray", linestyle="--", linewidth=1, label=f"best {best[0]} (step {best[1]})")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.suptitle(str(out_dir))
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m {{ cookiecutter.package_name }}.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="a run's out_dir (holding metrics.jsonl)")
    args = parser.parse_args(argv)
    if not (args.out_dir / "metrics.jsonl").is_file():
        print(
            f"error: {args.out_dir / 'metrics.jsonl'} does not exist (is {args.out_dir} a run's out_dir?)",
            file=sys.stderr,
        )
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plotting needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        return 2
    try:
        path = plot(args.out_dir)
    except json.JSONDecodeError as e:
        print(f"error: {args.out_dir / 'metrics.jsonl'} has a malformed line: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
