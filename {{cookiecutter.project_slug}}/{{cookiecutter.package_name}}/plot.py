"""Plot a run: ``python -m {{ cookiecutter.package_name }}.plot OUT_DIR`` writes OUT_DIR/curves.png.

Training loss (raw and smoothed) and validation loss, the other validation
metrics, and the learning rate, against the optimizer step, from
metrics.jsonl. Needs matplotlib: ``pip install -e '.[plot]'``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .metrics import read_metrics


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected so the start is not pulled towards zero."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def plot(out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    records = read_metrics(out_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    metric_names = sorted({k for r in evals for k in r} - {"step", "val_loss"})

    fig, (loss_ax, metric_ax, lr_ax) = plt.subplots(3, 1, sharex=True, figsize=(9, 10), constrained_layout=True)
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    loss_ax.plot(steps, losses, color="tab:blue", alpha=0.3, label="train loss")
    loss_ax.plot(steps, smooth(losses), color="tab:blue", label="train loss (smoothed)")
    loss_ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange",
                 label="val loss")  # fmt: skip
    loss_ax.set_ylabel("loss")
    if losses and min(losses) > 0:
        loss_ax.set_yscale("log")
    for name in metric_names:
        metric_ax.plot([r["step"] for r in evals if name in r], [r[name] for r in evals if name in r], "o-", label=name)
    metric_ax.set_ylabel("validation metric")
    lr_ax.plot(steps, [r["lr"] for r in train], color="tab:green", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    for ax in (loss_ax, metric_ax, lr_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
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
