{% if cookiecutter.loop == "plain" -%}
"""torchrun with 2 CPU processes (gloo): the same loop, data-parallel."""
{%- else -%}
"""torchrun with 2 CPU processes (gloo), which Accelerate joins as `accelerate launch` would: the same loop,
data-parallel."""
{%- endif %}

from __future__ import annotations

import json
import os
import re
{% if cookiecutter.loop == "plain" -%}
import shutil
{% endif -%}
import signal
{% if cookiecutter.loop == "plain" -%}
import socket
{% endif -%}
import subprocess
import sys
{% if cookiecutter.loop == "plain" -%}
import time
{% endif -%}
from pathlib import Path

import pytest
import torch

{% if cookiecutter.loop == "plain" -%}
from {{ cookiecutter.package_name }} import train as train_module
from {{ cookiecutter.package_name }}.essentials.checkpoint import CheckpointError, restore_training
{% endif -%}
from {{ cookiecutter.package_name }}.evaluate import evaluate_checkpoint
from {{ cookiecutter.package_name }}.machinery.metrics import read_metrics
from {{ cookiecutter.package_name }}.train import train

from . import stand_in
{%- if cookiecutter.loop == "plain" %}
from .conftest import ROOT, assert_same_weights, checkpoint, nan_loss_on, run_records, sharded_weights, train_records
from .faults import drawing_first
{%- else %}
from .conftest import ROOT, assert_same_weights, checkpoint, nan_loss_on, run_records
{%- endif %}

pytestmark = pytest.mark.distributed


def torchrun(out_dir: Path, *overrides: str, nproc: int = 2, env: dict | None = None,
             launch: tuple[str, ...] = ("--standalone",)) -> subprocess.Popen:  # fmt: skip
    for left in Path(out_dir).glob("probe-rank*"):  # an earlier launch's: a rank killed now must leave none
        left.unlink()
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={nproc}",
         str(ROOT / "tests" / "ddp_probe.py"), str(out_dir), "device=cpu", *overrides],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})},
    )  # fmt: skip


def probes(out_dir: Path, nproc: int = 2, output: str = "") -> list[dict]:
    """Each rank's report; ``output``: torchrun's, shown when a rank left none (it died before writing it)."""
    paths = [Path(out_dir) / f"probe-rank{rank}.json" for rank in range(nproc)]
    assert all(path.exists() for path in paths), f"no report from {[p.name for p in paths if not p.exists()]}\n{output}"
    return [json.loads(path.read_text()) for path in paths]


def test_two_processes_equal_one_process_with_twice_the_batch(make_config, monkeypatch, no_dropout, tmp_path):
    # The tests' task has sequences of different lengths: the ranks hold different numbers of tokens in
    # each step, and only weighting every token of both ranks alike equals one process.
    # With a weight EMA (each rank averages the same weights: no collective) evaluated in both runs.
    common = ["precision=fp32", "max_steps=12", "warmup_steps=2", "accum_steps=2", "log_every=3",
              "eval_every=6", "ckpt_every=6", "ema_decay=0.8"]  # fmt: skip
    out_dir = tmp_path / "ddp"
    # A NaN loss on rank 1 alone, in step 5: its gradients reach rank 0 through DDP's all-reduce. Steps 7 and 8
    # profiled: a trace from each rank, and the same numbers.
    process = torchrun(out_dir, *common, "batch_size=16", "profile_steps=7-8",
                       env={"PROBE_NAN_AT": "1:5", "STAND_IN_DROPOUT": "0"})  # fmt: skip
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "batch:      64 samples per optimizer step = 16 x 2 accum x 2 process(es)" in output

    reference = make_config(*common, "batch_size=32", name="single")
    nan_loss_on(monkeypatch, steps={9})  # the first micro-batch of step 5 (accum_steps=2)
    train(reference)

    # One metrics.jsonl, written once: no record twice, the same records as one process.
    records = read_metrics(out_dir / "metrics.jsonl")
    keys = [(r["step"], "val_loss" in r) for r in records]
    assert len(keys) == len(set(keys)) == 4 + 2
    assert [r["skipped"] for r in records if "skipped" in r] == [0, 1, 0, 0]
    single = read_metrics(Path(reference.out_dir) / "metrics.jsonl")
    for ours, theirs in zip(records, single, strict=True):
        assert ours.keys() == theirs.keys() and ours["step"] == theirs["step"]
        for key in ("loss", "grad_norm", "lr", "val_loss", "val_acc", "val_class_acc"):
            if key in ours:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (ours, theirs)
    a, b = checkpoint(out_dir)["model"], checkpoint(reference.out_dir)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)

    # Validation sums over both shards: the 2-process metric is the whole set's, as one process measures it.
    measured_alone = evaluate_checkpoint(out_dir / "last.pt")
    assert records[-1]["val_loss"] == pytest.approx(measured_alone["val_loss"], rel=1e-6)  # fp32 batch sums
    assert records[-1]["val_acc"] == measured_alone["val_acc"]
    assert records[-1]["val_class_acc"] == pytest.approx(measured_alone["val_class_acc"], rel=1e-12)  # vector totals

    # Gradients were all-reduced once per optimizer step, not once per micro-batch; every rank skipped step 5.
    assert [p["allreduce_calls"] for p in probes(out_dir)] == [12, 12]
    assert [p["steps_taken"] for p in probes(out_dir)] == [11, 11]
    # No rank leaves its model (which holds the process group) to be freed while the interpreter shuts down.
    assert [p["models_left"] for p in probes(out_dir)] == [0, 0]
    # Each rank draws from random streams of its own (dropout, augmentation): seeded with seed + rank.
    assert len({p["random_stream_at_start"] for p in probes(out_dir)}) == 2
    # Between log, eval and checkpoint steps (every 3rd here) the ranks exchange nothing but gradients
    # and, once per step, the step's summed loss and its number of terms (2 numbers), then their stop
    # requests (1 number, not waited for until the next step).
    for probe in probes(out_dir):
        after = {int(step): calls for step, calls in probe["collectives_after_step"].items()}
        assert all(after[step] == ["all_reduce:2", "all_reduce:1"] for step in range(1, 13) if step % 3), after
        assert all(after[step][:2] == ["all_reduce:2", "all_reduce:1"] for step in (3, 6, 9, 12)), after
        # Each checkpoint gathers the ranks' random streams to rank 0, which writes them, not to every rank.
        sent = [call.partition(":")[0] for calls in after.values() for call in calls]
        assert "gather_object" in sent and "all_gather_object" not in sent
    assert not list(out_dir.glob("*.tmp"))
    assert sorted(path.name for path in (out_dir / "profile").iterdir()) == ["trace-rank0.json", "trace-rank1.json"]


def test_sigterm_to_one_rank_stops_every_rank_and_resumes_in_one_process(make_config, tmp_path, caplog):
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
    # torchrun itself exits 1 here: the marker is what a requeue script reads.
    assert (out_dir / "stopped_by_signal").read_text() == f"signal 15 at step {stopped_at}\n"

    # The 2-process checkpoint continues in a single process (batch 32 = the same global batch).
    resumed = make_config(f"out_dir={out_dir}", "resume=auto", f"max_steps={stopped_at + 10}", "log_every=10",
                          "accum_steps=2", "batch_size=32", "ckpt_every=1000", "eval_every=1000")  # fmt: skip
    summary = train(resumed)
    assert summary["step"] == stopped_at + 10 and summary["exit_code"] == 0
    assert "saved by 2 process(es), now 1; random streams restart; 64 samples per optimizer step then, 64 now" in (
        caplog.text)  # fmt: skip
    assert not (out_dir / "stopped_by_signal").exists()
    data = checkpoint(out_dir)["data"]
    assert data["samples_in_epoch"] % 64 == 0


def test_a_rank_killed_under_max_restarts_is_restarted_and_the_run_finishes_bit_exact(tmp_path):
    # torchrun --max-restarts: when a process dies (kill -9, a lost node), every process is started again,
    # and resume=auto continues from the last checkpoint (step 5 here) to the uninterrupted run's weights.
    run = ["max_steps=12", "warmup_steps=2", "ckpt_every=5", "eval_every=6", "log_every=3", "resume=auto",
           "dist_timeout_minutes=0.5"]  # fmt: skip
    reference = torchrun(tmp_path / "reference", *run)
    output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, output
    restarted = torchrun(tmp_path / "restarted", *run, env={"PROBE_KILL_AT": "1:8"},
                         launch=("--standalone", "--max-restarts=1"))  # fmt: skip
    output, _ = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, output
    assert "exitcode: -9" in output and "resumed from" in output and "at step 5" in output
    assert [p["exit_code"] for p in probes(tmp_path / "restarted")] == [0, 0]
    expected = checkpoint(tmp_path / "reference")["model"]
    for key, value in checkpoint(tmp_path / "restarted")["model"].items():
        assert torch.equal(value, expected[key]), key  # bit for bit
    assert run_records(tmp_path / "restarted") == run_records(tmp_path / "reference")


def test_an_iterable_validation_set_in_uneven_parts_is_evaluated_whole(tmp_path, monkeypatch):
    # 481 validation sequences read as a stream: parts of 241 and 240, so 16 batches of 16 on rank 0 and 15 on
    # rank 1, which learns only then that it has no 16th: it repeats its 15th, uncounted, as rank 0 evaluates its
    # last{% if cookiecutter.loop == "plain" %} (FSDP gathers the weights from both ranks in each forward){% endif %}.
    run = ["max_steps=4", "warmup_steps=0", "eval_every=4", "log_every=4", "batch_size=16",
           "parallel={{ 'fsdp' if cookiecutter.loop == 'plain' else 'ddp' }}", "dist_timeout_minutes=0.5"]  # fmt: skip
    env = {"STAND_IN_VAL_STREAM": "1", "STAND_IN_VAL_SIZE": "481"}
    process = torchrun(tmp_path / "parts", *run, env=env)
    output, _ = process.communicate(timeout=300)
    assert [p["exit_code"] for p in probes(tmp_path / "parts", output=output)] == [0, 0], output
    best = checkpoint(tmp_path / "parts", "best.pt")
    monkeypatch.setattr(stand_in, "VAL_SIZE", 481)  # the same 481 sequences, map-style, in one process
    alone = evaluate_checkpoint(tmp_path / "parts" / "best.pt")
    assert alone["val_loss"] == pytest.approx(best["best_metric"], rel=1e-6)


def test_a_stream_under_torchrun_is_read_in_parts_and_a_stopped_run_resumes_exactly(tmp_path):
    # A training set without state_dict (read again on resume): each rank reads its part, by stream_part.
    run = ["max_steps=24", "accum_steps=2", "batch_size=16", "log_every=4", "eval_every=10", "ckpt_every=100"]
    env = {"STAND_IN_STREAM": "plain"}
    reference = torchrun(tmp_path / "reference", *run, env=env)
    output, _ = reference.communicate(timeout=300)
    reads = [p["stream_read"] for p in probes(tmp_path / "reference", output=output)]
    assert sorted(reads[0][:512] + reads[1][:512]) == list(range(1024))  # epoch 0: 512 samples each, none twice
    stopped = torchrun(tmp_path / "stopped", *run, env={**env, "PROBE_SIGTERM_AT": "1:10"})  # rank 1, step 10
    output, _ = stopped.communicate(timeout=300)
    assert [p["exit_code"] for p in probes(tmp_path / "stopped", output=output)] == [143, 143], output
    assert [len(workers) for workers in checkpoint(tmp_path / "stopped")["data"]["stream"]] == [1, 1]
    resumed = torchrun(tmp_path / "stopped", *run, "resume=auto", env=env)
    output, _ = resumed.communicate(timeout=300)
    assert [p["exit_code"] for p in probes(tmp_path / "stopped", output=output)] == [0, 0], output
    stopped, reference = tmp_path / "stopped", tmp_path / "reference"
    assert run_records(stopped) == run_records(reference)
    for name in ("last.pt", "best.pt"):
        assert_same_weights(checkpoint(stopped, name)["model"], checkpoint(reference, name)["model"])
{%- if cookiecutter.loop == "plain" %}


# The loop's own code, the same in both bakes: the default bake runs these.
def test_sigterm_to_torchrun_is_saved_inside_its_shutdown_window_whatever_log_every_is(tmp_path):
    # torchrun passes SIGTERM on to its processes and kills them --shutdown-timeout (30) seconds later: the
    # ranks must agree on the stop and save by then, though no log, evaluation or checkpoint step comes.
    out_dir, never = tmp_path / "ddp", "1000000"
    process = torchrun(out_dir, f"max_steps={never}", f"log_every={never}", f"eval_every={never}",
                       f"ckpt_every={never}", "batch_size=16")  # fmt: skip
    while not all((out_dir / f"probe-rank{rank}.training").exists() for rank in (0, 1)):
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.05)
    signalled = time.perf_counter()
    process.send_signal(signal.SIGTERM)  # to the agent, as SLURM or Kubernetes sends it
    output, _ = process.communicate(timeout=300)
    print(f"SIGTERM to torchrun: its processes saved and exited {time.perf_counter() - signalled:.1f} s later")
    # Had torchrun killed them, they would have left no probe file, no last.pt and no marker.
    assert [p["exit_code"] for p in probes(out_dir)] == [143, 143], output
    stopped_at = checkpoint(out_dir)["step"]
    assert (out_dir / "stopped_by_signal").read_text() == f"signal 15 at step {stopped_at}\n"


def test_two_torchrun_agents_one_process_each_train_as_one_agent_with_two(tmp_path):
    # Two nodes as the README launches them (--nnodes=2, a c10d rendezvous), here both on this machine.
    run = ["max_steps=6", "warmup_steps=2", "ckpt_every=6", "eval_every=3", "log_every=3"]
    one = torchrun(tmp_path / "one", *run)
    output, _ = one.communicate(timeout=300)
    assert one.returncode == 0, output
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        endpoint = f"localhost:{free.getsockname()[1]}"
    nodes = [torchrun(tmp_path / "two", *run, nproc=1, launch=("--nnodes=2", f"--node_rank={node}",
                      "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}")) for node in (0, 1)]  # fmt: skip
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert run_records(tmp_path / "two") == run_records(tmp_path / "one")
    expected = checkpoint(tmp_path / "one")["model"]
    for key, value in checkpoint(tmp_path / "two")["model"].items():
        assert torch.equal(value, expected[key]), key  # bit for bit


def test_an_out_dir_that_is_not_shared_stops_every_rank_at_start(tmp_path):
    # Each rank in a folder of its own: out_dir=run names another folder on each, as on nodes with their own disks.
    for node in (0, 1):
        (tmp_path / f"node{node}").mkdir()
    process = torchrun(Path("run"), "max_steps=4", "warmup_steps=0", env={"PROBE_NODE_DISKS": str(tmp_path)})
    output, _ = process.communicate(timeout=300)
    runs = [tmp_path / f"node{rank}" / "run" for rank in (0, 1)]
    reports = [run / f"probe-rank{rank}.json" for rank, run in enumerate(runs)]
    assert all(report.exists() for report in reports), output
    assert [json.loads(report.read_text())["exit_code"] for report in reports] == [2, 2], output
    assert "error (rank 1): out_dir run is not the folder rank 0 writes to" in output
    assert "error (rank 0): another process cannot see out_dir run" in output
    assert not list(runs[0].glob(".shared_check-*")) and not (runs[0] / "last.pt").exists()
{%- endif %}


def test_a_config_that_cannot_be_sharded_is_one_line_on_every_rank(tmp_path):
    process = torchrun(tmp_path / "ddp", env={"STAND_IN_VAL_SIZE": "1"})
    output, _ = process.communicate(timeout=300)
    assert [p["exit_code"] for p in probes(tmp_path / "ddp", output=output)] == [2, 2], output
    for rank in (0, 1):
        assert f"error (rank {rank}): the validation set has 1 sample(s), fewer than the 2 process(es)" in output
    # No traceback through our code (torchrun prints its own, and the script's path, which may hold the name).
    assert not re.search(r'File "[^"]*/{{ cookiecutter.package_name }}/\w+\.py"', output), output


def test_metric_totals_that_differ_between_ranks_stop_every_rank_instead_of_hanging(tmp_path):
    process = torchrun(tmp_path / "ddp", "max_steps=2", "warmup_steps=0", "dist_timeout_minutes=0.5",
                       env={"PROBE_EXTRA_TOTAL_ON": "1"})  # fmt: skip
    output, _ = process.communicate(timeout=300)
    assert [p["exit_code"] for p in probes(tmp_path / "ddp", output=output)] == [2, 2], output
    for rank in (0, 1):
        assert f"error (rank {rank}): metric_totals (task.py) returned" in output
    assert "other names or shapes on another process" in output


def test_an_error_on_one_rank_only_is_printed_with_its_rank(tmp_path):
    process = torchrun(tmp_path / "ddp", "dist_timeout_minutes=1", env={"PROBE_CONFIG_ERROR_ON": "1"})
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "error (rank 1): the data folder is missing on this node" in output, output
    assert json.loads((tmp_path / "ddp" / "probe-rank1.json").read_text())["exit_code"] == 2


def test_rank_0_decides_what_every_rank_resumes_from(tmp_path):
    out_dir, common = tmp_path / "ddp", ["warmup_steps=0", "eval_every=1000", "log_every=2", "dist_timeout_minutes=0.5"]
    first = torchrun(out_dir, *common, "max_steps=4")
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    # Rank 1's disk has no last.pt (node-local disks): it resumes from rank 0's checkpoint all the same.
    resumed = torchrun(out_dir, *common, "max_steps=6", "resume=auto", env={"PROBE_NO_CHECKPOINT_ON": "1"})
    output, _ = resumed.communicate(timeout=300)
    assert [p["exit_code"] for p in probes(out_dir)] == [0, 0], output
    assert "resumed from" in output and checkpoint(out_dir)["step"] == 6
    # A rank that cannot read it stops every rank, saying why.
    failed = torchrun(out_dir, *common, "max_steps=8", "resume=auto", env={"PROBE_UNREADABLE_ON": "1"})
    output, _ = failed.communicate(timeout=300)
    assert [p["exit_code"] for p in probes(out_dir)] == [1, 1], output
    assert "error (rank 1): checkpoint" in output and "every node needs the same out_dir" in output
    assert "error (rank 0): another process could not read" in output


def test_two_validation_sets_under_torchrun_are_each_the_whole_sets_metrics(make_config, no_dropout, tmp_path,
                                                                             monkeypatch):  # fmt: skip
    common = ["precision=fp32", "max_steps=4", "warmup_steps=0", "eval_every=2", "ckpt_every=4", "log_every=2",
              "monitor=shifted/val_acc"]  # fmt: skip
    env = {"STAND_IN_DROPOUT": "0", "STAND_IN_TWO_VAL_SETS": "1"}
    process = torchrun(tmp_path / "two", *common, "batch_size=16", env=env)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    monkeypatch.setattr(stand_in, "TWO_VAL_SETS", True)  # the same sets, in one process
    alone = make_config(*common, "batch_size=32", name="alone")
    train(alone)
    ours, theirs = ([r for r in read_metrics(Path(out) / "metrics.jsonl") if "shifted/val_acc" in r]
                    for out in (tmp_path / "two", alone.out_dir))  # fmt: skip
    assert len(ours) == 2 and [r.keys() for r in ours] == [r.keys() for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert all(a[key] == pytest.approx(b[key], rel=1e-5) for key in a), (a, b)
    assert checkpoint(tmp_path / "two")["best_step"] == checkpoint(alone.out_dir)["best_step"]


def test_sigterm_during_evaluation_stops_every_rank_at_once(tmp_path):
    out_dir = tmp_path / "ddp"
    process = torchrun(out_dir, "max_steps=100", "warmup_steps=0", "eval_every=10", "ckpt_every=100",
                       "batch_size=16", "dist_timeout_minutes=0.5", env={"PROBE_SIGTERM_IN_EVAL": "1"})  # fmt: skip
    output, _ = process.communicate(timeout=300)
    assert [p["exit_code"] for p in probes(out_dir)] == [143, 143], output
    saved = checkpoint(out_dir)
    assert saved["step"] == 10 and saved["eval_due"] is True
{%- if cookiecutter.loop == "plain" %}


def test_fsdp_trains_as_ddp_does_and_its_best_pt_evaluates_in_one_process(tmp_path, monkeypatch):
    # parallel=fsdp shards parameters, gradients and optimizer moments over the 2 ranks; with accumulation
    # (gradients reduce-scattered in every micro-batch) it must train as DDP does, norm for norm.
    common = ["precision=fp32", "max_steps=8", "warmup_steps=2", "accum_steps=2", "batch_size=16", "log_every=1",
              "eval_every=4", "ckpt_every=4", "dist_timeout_minutes=0.5", "keep_every=4"]  # fmt: skip
    # 481 validation sequences: shards of 241 and 240, so 16 batches of 16 on rank 0 and 15 on rank 1, which
    # must join rank 0's last forward (FSDP gathers the weights from both ranks in each).
    env = {"STAND_IN_DROPOUT": "0", "STAND_IN_VAL_SIZE": "481"}
    for strategy in ("ddp", "fsdp"):
        process = torchrun(tmp_path / strategy, *common, f"parallel={strategy}", env=env)
        output, _ = process.communicate(timeout=300)
        assert [p["exit_code"] for p in probes(tmp_path / strategy)] == [0, 0], output
    ddp, fsdp = (read_metrics(tmp_path / strategy / "metrics.jsonl") for strategy in ("ddp", "fsdp"))
    assert [r.keys() for r in ddp] == [r.keys() for r in fsdp]
    for a, b in zip(ddp, fsdp, strict=True):
        for key in ("loss", "grad_norm", "lr", "val_loss", "val_acc", "val_class_acc"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a, b)
    best, shards = checkpoint(tmp_path / "fsdp", "best.pt"), sharded_weights(tmp_path / "fsdp" / "last")[1]
    for theirs, ours in ((checkpoint(tmp_path / "ddp", "best.pt")["model"], best["model"]),
                         (checkpoint(tmp_path / "ddp")["model"], shards)):  # fmt: skip
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "fsdp" / "last.pt").exists()  # fsdp's latest state is the sharded folder last/
    for snapshot in ("step-00000004.pt", "step-00000008.pt"):  # kept snapshots: gathered on rank 0, as best.pt
        theirs, ours = (checkpoint(tmp_path / name / "snapshots", snapshot)["model"] for name in ("ddp", "fsdp"))
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(stand_in, "VAL_SIZE", 481)
    # Gradients reduce-scattered in each micro-batch (2 a step), for each of the 3 sharded units.
    assert [p["reduce_scatter_calls"] for p in probes(tmp_path / "fsdp")] == [8 * 2 * 3, 8 * 2 * 3]
    # fsdp's best.pt holds the weights without the optimizer's state (never gathered whole), ddp's holds both.
    assert "optimizer" not in best and "optimizer" in checkpoint(tmp_path / "ddp", "best.pt")
    with pytest.raises(CheckpointError, match="holds weights only .* init_from="):
        restore_training(tmp_path / "fsdp" / "best.pt", best, None, None)
    alone = evaluate_checkpoint(tmp_path / "fsdp" / "best.pt")  # 1 process: batch sums in another order
    assert alone[best["config"]["monitor"]] == pytest.approx(best["best_metric"], rel=1e-6)
    shards_alone = evaluate_checkpoint(tmp_path / "fsdp" / "last")  # both ranks' shards, read by one process
    assert shards_alone["val_loss"] == pytest.approx(fsdp[-1]["val_loss"], rel=1e-6)


def test_fsdp_starts_from_rank_0s_weights_whatever_each_rank_drew(make_config, no_dropout, tmp_path, monkeypatch):
    # Each rank draws rank + 1 numbers from the global streams while its datasets are built, before the model is.
    common = ["precision=fp32", "max_steps=1", "warmup_steps=0", "log_every=1", "eval_every=100", "ckpt_every=100"]
    env = {"PROBE_RANK_DRAWS": "1", "STAND_IN_DROPOUT": "0"}
    process = torchrun(tmp_path / "fsdp", *common, "parallel=fsdp", env=env)
    output, _ = process.communicate(timeout=300)
    assert [p["exit_code"] for p in probes(tmp_path / "fsdp", output=output)] == [0, 0], output
    monkeypatch.setattr(train_module, "build_datasets", drawing_first(train_module.build_datasets, 1))  # as rank 0
    alone = make_config(*common, "batch_size=64", name="alone")
    train(alone)
    fsdp_loss, alone_loss = (train_records(out_dir)[0]["loss"] for out_dir in (tmp_path / "fsdp", alone.out_dir))
    assert fsdp_loss == pytest.approx(alone_loss, rel=1e-6)


def test_fsdp_on_the_cpu_stays_there_on_a_machine_whose_accelerator_is_a_gpu(tmp_path):
    # fully_shard without a mesh would build one on torch._C._get_accelerator(), here "cuda": on a GPU machine a
    # device=cpu run would move each unit to the GPU while its batches and gloo stay on the CPU.
    run = ["parallel=fsdp", "max_steps=2", "warmup_steps=0", "eval_every=2", "ckpt_every=2"]
    process = torchrun(tmp_path / "fsdp", *run, env={"PROBE_ACCELERATOR": "cuda"})
    output, _ = process.communicate(timeout=300)
    assert [p["exit_code"] for p in probes(tmp_path / "fsdp", output=output)] == [0, 0], output


def test_activation_checkpointing_under_fsdp_trains_the_same_numbers_in_less_memory(tmp_path):
    env = {"STAND_IN_DEPTH": "6", "STAND_IN_WIDTH": "128", "MALLOC_MMAP_THRESHOLD_": "131072"}
    run = ["parallel=fsdp", "batch_size=256", "max_steps=3", "warmup_steps=0", "log_every=1", "eval_every=3"]
    run += ["precision=fp32"]  # activations of 4 bytes, whatever precision the project was baked with
    peaks = {}
    for on in ("false", "true"):
        process = torchrun(tmp_path / on, *run, "ckpt_every=3", f"activation_checkpointing={on}", env=env)
        output, _ = process.communicate(timeout=300)
        reports = probes(tmp_path / on, output=output)
        assert [r["exit_code"] for r in reports] == [0, 0], output
        peaks[on] = [r["peak_resident_kib"] / 1024 for r in reports]
    print(f"peak resident MiB of each rank: {peaks['false']} without activation checkpointing, {peaks['true']} with")
    assert run_records(tmp_path / "true") == run_records(tmp_path / "false")
    for rank in (0, 1):
        assert peaks["true"][rank] < peaks["false"][rank] - 40, peaks  # about 80 MiB of activations per rank


MODEL_MIB = 256  # a frozen trunk of 16 units: big in memory, almost no compute


def test_under_fsdp_no_rank_but_0_ever_holds_the_whole_model(tmp_path):
    # Each rank's peak resident memory with the trunk, over the same run's without it. glibc's threshold set low,
    # so that blocks torch frees go back to the system and the peak is what torch held (not glibc's cache).
    run = ["parallel=fsdp", "max_steps=2", "warmup_steps=0", "batch_size=4", "log_every=1", "eval_every=2"]
    run += ["ckpt_every=2", "max_eval_batches=1", "dist_timeout_minutes=2", "async_save=false"]  # set-up, training
    peaks = {}
    for megabytes in (0, MODEL_MIB):
        env = {"STAND_IN_TRUNK_MB": str(megabytes), "MALLOC_MMAP_THRESHOLD_": "131072"}
        process = torchrun(tmp_path / str(megabytes), *run, env=env)
        output, _ = process.communicate(timeout=300)
        reports = probes(tmp_path / str(megabytes), output=output)
        assert [r["exit_code"] for r in reports] == [0, 0], output
        peaks[megabytes] = [r["peak_resident_kib"] / 1024 for r in reports]
    added = [big - tiny for tiny, big in zip(peaks[0], peaks[MODEL_MIB], strict=True)]
    print(f"peak resident MiB added by a {MODEL_MIB} MiB model: rank 0 {added[0]:.0f}, rank 1 {added[1]:.0f}")
    assert added[1] < 0.85 * MODEL_MIB, added  # its half of the shards, one unit gathered, one tensor broadcast


def test_a_crash_inside_a_sharded_save_in_the_background_leaves_the_previous_one_to_resume_from(tmp_path):
    run = ["parallel=fsdp", "max_steps=10", "ckpt_every=5", "eval_every=100", "log_every=5", "warmup_steps=0"]
    env = {"STAND_IN_DROPOUT": "0"}
    reference = torchrun(tmp_path / "reference", *run, env=env)
    output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, output
    crashed = torchrun(tmp_path / "crashed", *run, env={**env, "PROBE_CRASH_IN_SAVE": "2"})
    output, _ = crashed.communicate(timeout=300)
    assert [p["exit_code"] for p in probes(tmp_path / "crashed", output=output)] == [1, 1], output
    last = tmp_path / "crashed" / "last"
    assert (last / "latest").read_text() == "step-00000005\n" and (last / "step-00000010").exists()
    resumed = torchrun(tmp_path / "crashed", *run, "resume=auto", env=env)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    step, weights = sharded_weights(last)
    assert step == 10
    assert_same_weights(weights, sharded_weights(tmp_path / "reference" / "last")[1])


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_sgd_and_muon_train_under_fsdp_as_one_process_does(make_config, no_dropout, tmp_path, optimizer):
    # FSDP's sharded parameters have no fused SGD kernel: SGD takes its foreach path there. Muon orthogonalizes
    # each whole matrix (DTensor gathers it), in bf16: the order of its sums differs from one process's.
    common = [f"optimizer={optimizer}", "precision=fp32", "max_steps=4", "warmup_steps=0", "log_every=1",
              "eval_every=100", "ckpt_every=100"]  # fmt: skip
    process = torchrun(tmp_path / "fsdp", *common, "parallel=fsdp", "batch_size=16", env={"STAND_IN_DROPOUT": "0"})
    output, _ = process.communicate(timeout=300)
    assert [p["exit_code"] for p in probes(tmp_path / "fsdp")] == [0, 0], output
    single = make_config(*common, "batch_size=32", name="single")  # the same global batch
    train(single)
    fsdp, alone = ([r["loss"] for r in read_metrics(Path(path) / "metrics.jsonl") if "loss" in r]
                   for path in (tmp_path / "fsdp", single.out_dir))  # fmt: skip
    print(f"{optimizer} losses under fsdp {fsdp}, in one process {alone}")
    assert len(fsdp) == 4 and fsdp == pytest.approx(alone, rel=1e-5 if optimizer == "sgd" else 1e-4)


def test_fsdp_accumulation_holds_1_nth_of_the_gradients_unless_told_to_keep_them_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(stand_in, "WIDTH", 256)  # 74,000 parameters
    model_bytes = 4 * sum(p.numel() for p in stand_in.build_model(None).parameters())
    run = ["parallel=fsdp", "precision=fp32", "max_steps=2", "warmup_steps=0", "accum_steps=4", "batch_size=8",
           "log_every=1", "eval_every=100", "ckpt_every=100"]  # fmt: skip
    held = {}
    for accumulate in ("sharded", "whole"):
        out_dir = tmp_path / accumulate
        process = torchrun(out_dir, *run, f"fsdp_accumulate={accumulate}",
                           env={"STAND_IN_WIDTH": "256", "PROBE_GRADIENT_BYTES": "1"})  # fmt: skip
        output, _ = process.communicate(timeout=300)
        assert [p["exit_code"] for p in probes(out_dir)] == [0, 0], output
        held[accumulate] = [p["gradient_bytes_held"] for p in probes(out_dir)]
        # Sharded: each of the 3 units reduce-scatters in every micro-batch; whole: in the last one only.
        calls = 2 * 3 * (4 if accumulate == "sharded" else 1)
        assert [p["reduce_scatter_calls"] for p in probes(out_dir)] == [calls, calls]
    print(f"gradient bytes held by each rank in a step's last micro-batch: {held} (model: {model_bytes})")
    assert all(held_by_rank <= 0.51 * model_bytes for held_by_rank in held["sharded"]), (held, model_bytes)
    assert all(held_by_rank >= model_bytes for held_by_rank in held["whole"]), (held, model_bytes)


def test_an_fsdp_run_stopped_by_sigterm_resumes_exactly_on_2_processes_and_on_1(make_config, no_dropout, tmp_path):
    # No dropout: one process draws from other random streams than two, and must still reach the same weights.
    # With a weight EMA, each rank's average of its own shards: sharded_weights reads the average.
    env = {"STAND_IN_DROPOUT": "0"}
    run = ["parallel=fsdp", "max_steps=24", "warmup_steps=2", "accum_steps=2", "batch_size=16", "log_every=4",
           "eval_every=8", "ckpt_every=100", "dist_timeout_minutes=0.5", "ema_decay=0.9"]  # fmt: skip
    reference = torchrun(tmp_path / "reference", *run, env=env)
    output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, output
    stopped = torchrun(tmp_path / "stopped", *run, env={**env, "PROBE_SIGTERM_AT": "1:10"})  # rank 1, step 10
    output, _ = stopped.communicate(timeout=300)
    assert [p["exit_code"] for p in probes(tmp_path / "stopped")] == [143, 143], output
    step, _ = sharded_weights(tmp_path / "stopped" / "last")
    assert step == 11  # the ranks agreed on it during the next step
    assert "stopped by signal 15 at step 11; last saved, resume with resume=auto" in output  # the folder
    assert sorted(p.name for p in (tmp_path / "stopped" / "last" / "step-00000011").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shards  # fmt: skip
    shutil.copytree(tmp_path / "stopped", tmp_path / "alone")

    resumed = torchrun(tmp_path / "stopped", *run, "resume=auto", env=env)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    _, expected = sharded_weights(tmp_path / "reference" / "last")
    assert run_records(tmp_path / "stopped") == run_records(tmp_path / "reference")
    for key, value in sharded_weights(tmp_path / "stopped" / "last")[1].items():
        assert torch.equal(value, expected[key]), key  # bit for bit
    best = checkpoint(tmp_path / "stopped", "best.pt")  # gathered on rank 0: the average, as evaluation used it
    assert best["step"] == 24 and all(torch.equal(best["model"][key], value) for key, value in expected.items())

    # One process (batch 32: the same global batch) reads both ranks' shards, and continues to the same weights.
    summary = train(make_config(*run, f"out_dir={tmp_path / 'alone'}", "resume=auto", "batch_size=32"))
    assert summary["step"] == 24
    for key, value in sharded_weights(tmp_path / "alone" / "last")[1].items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5)
{%- endif %}
