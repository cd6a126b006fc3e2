"""torchrun with 2 CPU processes (gloo): the same loop, data-parallel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from {{ cookiecutter.package_name }}.evaluate import evaluate_checkpoint
from {{ cookiecutter.package_name }}.metrics import read_metrics
from {{ cookiecutter.package_name }}.train import train

from .conftest import ROOT, checkpoint

pytestmark = pytest.mark.distributed


def torchrun(out_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(ROOT / "tests" / "ddp_probe.py"), str(out_dir), "device=cpu", *overrides],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def probes(out_dir: Path, nproc: int = 2) -> list[dict]:
    return [json.loads((out_dir / f"probe-rank{rank}.json").read_text()) for rank in range(nproc)]


def test_two_processes_equal_one_process_with_twice_the_batch(make_config, tmp_path):
    common = ["precision=fp32", "dropout=0", "max_steps=12", "warmup_steps=2", "accum_steps=2", "log_every=1",
              "eval_every=6", "ckpt_every=6"]  # fmt: skip
    out_dir = tmp_path / "ddp"
    process = torchrun(out_dir, *common, "batch_size=16")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "batch:      64 samples per optimizer step = 16 x 2 accum x 2 process(es)" in output

    reference = make_config(*common, "batch_size=32", name="single")
    train(reference)

    # One metrics.jsonl, written once: no record twice, the same records as one process.
    records = read_metrics(out_dir / "metrics.jsonl")
    keys = [(r["step"], "val_loss" in r) for r in records]
    assert len(keys) == len(set(keys)) == 12 + 2
    single = read_metrics(Path(reference.out_dir) / "metrics.jsonl")
    for ours, theirs in zip(records, single, strict=True):
        assert ours.keys() == theirs.keys() and ours["step"] == theirs["step"]
        for key in ("loss", "grad_norm", "val_loss", "val_acc"):
            if key in ours:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (ours, theirs)
    a, b = checkpoint(out_dir)["model"], checkpoint(reference.out_dir)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)

    # Validation sums over both shards: the 2-process metric is the whole set's, as one process measures it.
    measured_alone = evaluate_checkpoint(out_dir / "last.pt")
    assert records[-1]["val_loss"] == pytest.approx(measured_alone["val_loss"], rel=1e-6)  # fp32 batch sums
    assert records[-1]["val_acc"] == measured_alone["val_acc"]

    # Gradients were all-reduced once per optimizer step, not once per micro-batch.
    assert [p["allreduce_calls"] for p in probes(out_dir)] == [12, 12]
    assert not list(out_dir.glob("*.tmp"))


def test_sigterm_to_one_rank_stops_every_rank_and_resumes_in_one_process(make_config, tmp_path):
    out_dir = tmp_path / "ddp"
    process = torchrun(out_dir, "max_steps=5000", "log_every=10", "ckpt_every=1000", "eval_every=1000",
                       "accum_steps=2", "batch_size=16")  # fmt: skip
    for line in process.stdout:
        if line.startswith("step 20/"):
            os.kill(int((out_dir / "probe-rank1.pid").read_text()), signal.SIGTERM)  # rank 1 only
            break
    output, _ = process.communicate(timeout=300)
    # torchrun reports its own code; each rank's code is in its probe file.
    assert [p["exit_code"] for p in probes(out_dir)] == [143, 143], output
    stopped_at = checkpoint(out_dir)["step"]
    assert 20 <= stopped_at < 1000
    assert f"stopped by signal 15 at step {stopped_at}" in output
    assert len(checkpoint(out_dir)["rng"]) == 2  # every rank's random streams

    # The 2-process checkpoint continues in a single process (batch 32 = the same global batch).
    resumed = make_config(f"out_dir={out_dir}", "resume=auto", f"max_steps={stopped_at + 10}", "log_every=10",
                          "accum_steps=2", "batch_size=32", "ckpt_every=1000", "eval_every=1000")  # fmt: skip
    summary = train(resumed)
    assert summary["step"] == stopped_at + 10 and summary["exit_code"] == 0
    data = checkpoint(out_dir)["progress"]["data"]
    assert data["samples_in_epoch"] % 64 == 0
