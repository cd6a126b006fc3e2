"""YOUR task: data.py, model.py, task.py and configs/smoke.yaml fit the loop, and the smoke config learns.

These tests run your code, so they follow it: adjust them when you replace the task (the thresholds
of ``test_smoke_training_learns`` especially). Every other test file proves the loop itself, on a task
of its own (stand_in.py), and must stay green whatever you put here.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from {{ cookiecutter.package_name }}.data import build_datasets
from {{ cookiecutter.package_name }}.essentials.config import load_config
from {{ cookiecutter.package_name }}.essentials.precision import Precision
from {{ cookiecutter.package_name }}.essentials.validation import evaluate_sets, monitor_goal
from {{ cookiecutter.package_name }}.machinery.distributed import Process
from {{ cookiecutter.package_name }}.machinery.loader import build_loaders
from {{ cookiecutter.package_name }}.machinery.metrics import read_metrics
from {{ cookiecutter.package_name }}.model import build_model
from {{ cookiecutter.package_name }}.task import METRIC_GOALS, compute_loss, compute_metrics, metric_totals
from {{ cookiecutter.package_name }}.train import blocks, train  # model.py's, or the default when it has none

from .conftest import ROOT

pytestmark = pytest.mark.your_task
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture
def smoke(tmp_path):
    """configs/smoke.yaml on the CPU, writing under tmp_path, with the model and a batch of it."""
    torch.manual_seed(0)
    cfg = load_config(SMOKE, [f"out_dir={tmp_path / 'run'}", "device=cpu"])
    train_set, val_set = build_datasets(cfg)
    shuffle = not isinstance(train_set, IterableDataset)  # a stream comes in its own order
    inputs, targets = next(iter(DataLoader(train_set, batch_size=max(cfg.batch_size, 4), shuffle=shuffle)))
    return cfg, build_model(cfg), inputs, targets


def test_one_batch_goes_forward_and_backward(smoke):
    cfg, model, inputs, targets = smoke
    loss_sum, count = compute_loss(model(inputs), targets)
    assert loss_sum.ndim == 0 and math.isfinite(loss_sum.item()) and int(count) > 0
    (loss_sum / count).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None for g in grads), "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    own = [id(module) for module in model.modules()]
    assert all(id(block) in own for block in blocks(model)), "blocks must return submodules of the model"


def test_the_loss_is_a_sum_and_a_count(smoke):
    # The loop divides the step's total sum by its total count: a mean here would weigh batches wrongly.
    _, model, inputs, targets = smoke
    model.eval()  # no dropout: the halves and the whole see the same model
    half = len(inputs) // 2
    with torch.no_grad():
        whole = compute_loss(model(inputs), targets)
        parts = [compute_loss(model(inputs[s]), targets[s]) for s in (slice(None, half), slice(half, None))]
    torch.testing.assert_close(whole[0], parts[0][0] + parts[1][0], rtol=1e-4, atol=1e-4)
    assert int(whole[1]) == int(parts[0][1]) + int(parts[1][1])


def test_the_metrics_add_up_over_batches(smoke):
    # Evaluation adds metric_totals over batches (and processes), then calls compute_metrics once.
    cfg, model, inputs, targets = smoke
    model.eval()
    half = len(inputs) // 2
    with torch.no_grad():
        output = model(inputs)
        whole = metric_totals(output, targets, cfg.task)
        first = metric_totals(output[:half], targets[:half], cfg.task)
        second = metric_totals(output[half:], targets[half:], cfg.task)
    for name, value in whole.items():
        added = torch.as_tensor(first[name], dtype=torch.float64) + torch.as_tensor(second[name], dtype=torch.float64)
        whole_value = torch.as_tensor(value, dtype=torch.float64)
        close = torch.allclose(whole_value, added, rtol=1e-4, atol=1e-4)
        assert close, f"metric_totals' '{name}' over a batch is not the sum over its halves: {whole_value} != {added}"
    totals = {name: torch.as_tensor(value, dtype=torch.float64) for name, value in whole.items()}
    metrics = compute_metrics(totals, cfg.task)
    assert set(metrics) == set(METRIC_GOALS), "METRIC_GOALS (task.py) names every metric, with its direction"
    assert set(METRIC_GOALS.values()) <= {"min", "max"}
    assert cfg.monitor in metrics, f"configs/smoke.yaml monitors '{cfg.monitor}', which task.py does not measure"


def test_model_py_and_task_py_load_without_the_rest_of_the_project():
    # What the exported weights need (README, after the export command): build_model and task.py's settings.
    package = build_model.__module__.rpartition(".")[0]
    code = (
        f"import sys, {package}.model, {package}.task; "
        f"print(sorted(m for m in sys.modules if m.startswith('{package}')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == str([package, f"{package}.model", f"{package}.task"]), result.stdout + result.stderr


def test_smoke_training_learns(smoke):
    cfg, untrained, _, _ = smoke
    _, val_loaders = build_loaders(cfg, *build_datasets(cfg), Process())  # one validation set, or several
    before = evaluate_sets(untrained, val_loaders, torch.device("cpu"), Precision("fp32", "cpu"), cfg.task)
    summary = train(cfg)
    losses = [r["loss"] for r in read_metrics(Path(cfg.out_dir) / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0], losses
    # Better than the untrained model on the validation set (raise the bar to what your task reaches).
    after = summary["metrics"][cfg.monitor]
    assert after < before[cfg.monitor] if monitor_goal(cfg) == "min" else after > before[cfg.monitor]
