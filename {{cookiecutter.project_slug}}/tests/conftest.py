from __future__ import annotations

from pathlib import Path

import pytest
import torch

from {{ cookiecutter.package_name }} import checkpoint as checkpoint_module
from {{ cookiecutter.package_name }} import train as train_module
from {{ cookiecutter.package_name }}.config import Config, load_config
from {{ cookiecutter.package_name }}.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture
def make_config(tmp_path):
    """configs/smoke.yaml on the CPU, writing under tmp_path/<name>, plus key=value overrides."""

    def make(*overrides: str, name: str = "run") -> Config:
        return load_config(SMOKE, [f"out_dir={tmp_path / name}", "device=cpu", *overrides])

    return make


def nan_loss_on(
    monkeypatch, steps: set[int] | None = None, from_step: int | None = None, finite_gradients: bool = False
) -> None:
    """Make the loss NaN at these optimizer steps (1-based, accum_steps=1), or from ``from_step`` on.
    ``finite_gradients``: make it inf instead, by adding a constant, so that the gradients stay finite."""
    calls = {"n": 0}
    real_loss = train_module.compute_loss

    def loss(output, target):
        calls["n"] += 1
        value = real_loss(output, target)
        bad = (steps and calls["n"] in steps) or (from_step is not None and calls["n"] >= from_step)
        if not bad:
            return value
        return value + float("inf") if finite_gradients else value * float("nan")

    monkeypatch.setattr(train_module, "compute_loss", loss)


def record_saves(monkeypatch) -> list[tuple[str, int]]:
    """(file name, step) of every checkpoint the loop writes, in order."""
    saved = []
    real_save = checkpoint_module.save_checkpoint

    def save(state, path):
        saved.append((path.name, state["step"]))
        real_save(state, path)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save)
    return saved


def checkpoint(out_dir: str | Path, name: str = "last.pt") -> dict:
    return torch.load(Path(out_dir) / name, map_location="cpu", weights_only=True)


def train_records(out_dir: str | Path) -> list[dict]:
    return [r for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "loss" in r or "skipped" in r]


def eval_records(out_dir: str | Path) -> list[dict]:
    return [r for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "val_loss" in r]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
