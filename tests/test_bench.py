"""The benchmark runs and reports every setting. Its figures are measured on purpose, by hand (README, Speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import TEMPLATE


def test_benchmark_smoke_run_reports_every_setting(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TEMPLATE / "benchmarks" / "bench.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=1800,  # about 2 minutes alone; a machine busy with the baked suites takes several times that
        env={**os.environ, "TMPDIR": str(tmp_path)},  # the baked project and its runs
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    settings = {(row["task"], row["precision"], row["accum_steps"]) for row in report["training"]}
    assert settings == {(t, p, a) for t in ("mlp", "transformer") for p in ("fp32", "bf16") for a in (1, 4)}
    for row in report["training"]:
        assert row["bare_steps_per_s"] > 0 and row["loop_steps_per_s"] > 0 and row["accelerate_steps_per_s"] > 0
        # steps/s are rounded to 0.1, which moves the slowest settings (about 4 steps/s) by up to 3%
        assert row["ratio"] == pytest.approx(row["loop_steps_per_s"] / row["bare_steps_per_s"], rel=0.05)
        ratio = row["accelerate_steps_per_s"] / row["bare_steps_per_s"]
        assert row["accelerate_ratio"] == pytest.approx(ratio, rel=0.05)
    assert report["eval_ratio"] > 0 and report["save_ratio"] > 0 and report["checkpoint_mb"] > 1
    recipes = report["recipes"]  # the weight EMA's and Muon's cost per step, against AdamW alone
    assert set(recipes["ms_per_step"]) == {"adamw", "ema_decay=0.999", "optimizer=muon"}, recipes
    assert all(ms > 0 for ms in recipes["ms_per_step"].values()) and recipes["ratio_to_adamw"]["adamw"] == 1.0
    assert recipes["ema_mb"] > 0
    assert "| mlp | fp32 | 1 |" in result.stdout
    # Start-up and code lines, for both loops: the accelerate loop's clipping is one call to Accelerate's.
    assert set(report["startup"]) == set(report["code_lines"]) == {"plain", "accelerate"}
    # Measured, not compared: in a smoke run (one round) a busy machine can make either one slower.
    assert all(times["import"] > 0 and times["one_step"] > 0 for times in report["startup"].values()), report
    lines = report["code_lines"]
    assert lines["plain"]["gradient clipping"] > lines["accelerate"]["gradient clipping"] > 0
    assert lines["plain"]["config"] == lines["accelerate"]["config"] > 0
