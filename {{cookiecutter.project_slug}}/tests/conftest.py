from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
