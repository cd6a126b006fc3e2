from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
{%- if cookiecutter.loop == "accelerate" %}
from accelerate.state import AcceleratorState
{%- endif %}

from {{ cookiecutter.package_name }} import train as train_module
from {{ cookiecutter.package_name }}.essentials import checkpoint as checkpoint_module
from {{ cookiecutter.package_name }}.essentials.config import Config, load_config
from {{ cookiecutter.package_name }}.machinery.metrics import read_metrics
from {{ cookiecutter.package_name }}.machinery.speed import MEASURED

from . import stand_in

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "your_task: a test of your task (data.py, model.py, task.py, configs)")


@pytest.fixture(autouse=True)
def stand_in_task(request, monkeypatch):
    """Every test runs the loop on the tests' own task (stand_in.py), except those marked your_task."""
    if request.node.get_closest_marker("your_task") is None:
        stand_in.install(monkeypatch.setattr)


{%- if cookiecutter.loop == "accelerate" %}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate sets its state (the precision) once per process, and these tests train many times in one: each
    test starts with none, as a new process would (Accelerate's own tests reset it so)."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
{%- endif %}


@pytest.fixture
def no_dropout(monkeypatch):
    """The tests' model without dropout: runs that differ in batching or processes can then agree exactly."""
    monkeypatch.setattr(stand_in, "DROPOUT", 0.0)


@pytest.fixture
def make_config(tmp_path):
    """The tests' loop settings (stand_in.LOOP), writing under tmp_path/<name>, plus key=value overrides."""

    def make(*overrides: str, name: str = "run") -> Config:
        return load_config(None, [*stand_in.LOOP, f"out_dir={tmp_path / name}", *overrides])

    return make


def cli(out_dir: str | Path, *overrides: str) -> list[str]:
    """The training command's arguments for the tests' loop settings (stand_in.LOOP) and ``overrides``."""
    return [*stand_in.LOOP, f"out_dir={out_dir}", *overrides]


def nan_loss_on(
    monkeypatch, steps: set[int] | None = None, from_step: int | None = None, finite_gradients: bool = False
) -> None:
    """Make the loss NaN at these micro-batches (1-based; optimizer steps with accum_steps=1), or from
    ``from_step`` on. ``finite_gradients``: make it inf instead, by adding a constant, so that the
    gradients stay finite."""
    calls = {"n": 0}
    real_loss = train_module.compute_loss

    def loss(output, target):
        calls["n"] += 1
        value, count = real_loss(output, target)
        bad = (steps and calls["n"] in steps) or (from_step is not None and calls["n"] >= from_step)
        if not bad:
            return value, count
        return (value + float("inf") if finite_gradients else value * float("nan")), count

    monkeypatch.setattr(train_module, "compute_loss", loss)


def before_each_step(monkeypatch, look: Callable[[torch.optim.Optimizer], None]) -> None:
    """Call ``look(optimizer)`` just before every step the optimizer takes (skipped ones included: a fused
    optimizer skips inside its step), whichever loop calls it."""
    real_build = train_module.build_optimizer

    def build_watched_optimizer(model, cfg, device, *rest):
        optimizer = real_build(model, cfg, device, *rest)
        real_step = optimizer.step

        def step(*args, **kwargs):
            look(optimizer)
            return real_step(*args, **kwargs)

        optimizer.step = step
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", build_watched_optimizer)


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


def sharded_weights(folder: str | Path) -> tuple[int, dict[str, torch.Tensor]]:
    """The step and the whole weights of a sharded checkpoint (parallel=fsdp's out_dir/last), read in this process."""
    saved = checkpoint_module.read_sharded(Path(folder))
    model = stand_in.build_model(None)
    checkpoint_module.load_weights(model, saved, folder)
    return saved["step"], model.state_dict()


def first_moments(saved: dict) -> dict[str, torch.Tensor]:
    """The optimizer state (step, exp_avg, exp_avg_sq) of a checkpoint's first parameter."""
    return next(iter(saved["optimizer"]["state"].values()))


def run_records(out_dir: str | Path) -> list[dict]:
    """metrics.jsonl without the speed figures (timings and memory), which differ between runs of equal numbers."""
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in read_metrics(Path(out_dir) / "metrics.jsonl")]


def train_records(out_dir: str | Path) -> list[dict]:
    return [r for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "loss" in r or "skipped" in r]


def eval_records(out_dir: str | Path) -> list[dict]:
    return [r for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "val_loss" in r]  # stand_in's metric


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
