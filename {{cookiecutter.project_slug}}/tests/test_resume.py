"""Never lose a run: exact resume, crash-safe checkpoints, preemption, non-finite guards."""

from __future__ import annotations

import errno
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from {{ cookiecutter.package_name }} import train as train_module
from {{ cookiecutter.package_name }}.essentials import checkpoint as checkpoint_module
from {{ cookiecutter.package_name }}.essentials import validation as validation_module
from {{ cookiecutter.package_name }}.essentials.checkpoint import CheckpointError, save_checkpoint
from {{ cookiecutter.package_name }}.essentials.schedule import lr_at
from {{ cookiecutter.package_name }}.machinery import signals as signals_module
from {{ cookiecutter.package_name }}.machinery.distributed import Process
from {{ cookiecutter.package_name }}.machinery.loader import build_loaders
from {{ cookiecutter.package_name }}.machinery.metrics import read_metrics
from {{ cookiecutter.package_name }}.machinery.state import StepLog
from {{ cookiecutter.package_name }}.train import TrainingError, main, train

from . import stand_in
from .augment import augmenting
from .conftest import (
    ROOT,
    assert_same_weights,
    checkpoint,
    cli,
    first_moments,
    nan_loss_on,
    record_saves,
    run_records,
{%- if cookiecutter.loop == "plain" %}
    sharded_weights,
{%- endif %}
    train_records,
)
from .faults import FailOnCall, InjectedFailure, SignalOnCall, slowed

# 1024 samples / batch 32 = 32 micro-batches per epoch = 16 optimizer steps with accum_steps=2.
RUN = ["max_steps=40", "accum_steps=2", "log_every=5", "eval_every=15", "ckpt_every=10"]


def signal_during_step(monkeypatch, step: int, accum_steps: int = 2, signum: int = signal.SIGTERM) -> None:
    """Send ``signum`` to this process in the middle of optimizer step ``step`` (1-based)."""
    first_micro_batch = (step - 1) * accum_steps + 1
    monkeypatch.setattr(
        train_module, "compute_loss", SignalOnCall(train_module.compute_loss, first_micro_batch, signum)
    )


def assert_same_run(a: str, b: str) -> None:
    assert run_records(a) == run_records(b)
    for name in ("last.pt", "best.pt"):
        assert_same_weights(checkpoint(a, name)["model"], checkpoint(b, name)["model"])
    assert first_moments(checkpoint(a))["exp_avg"].equal(first_moments(checkpoint(b))["exp_avg"])


@pytest.fixture
def augmented(monkeypatch):
    """Random augmentation in the training set's __getitem__: what exact resume must survive."""
    monkeypatch.setattr(train_module, "build_datasets", augmenting(train_module.build_datasets, stand_in.VOCAB))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stop_mid_epoch_then_resume_is_bit_identical(make_config, monkeypatch, augmented, num_workers):
    workers = f"num_workers={num_workers}"
    reference = make_config(*RUN, workers, name="reference")
    train(reference)

    interrupted = make_config(*RUN, workers, name="interrupted")
    with monkeypatch.context() as patch:
        signal_during_step(patch, step=23)  # epoch 1, 7 steps in: mid-epoch, between checkpoints
        summary = train(interrupted)
    assert summary["step"] == 23 and summary["exit_code"] == 128 + signal.SIGTERM
    assert checkpoint(interrupted.out_dir)["data"] == {"epoch": 1, "samples_in_epoch": 14 * 32}

    resumed = train(make_config(*RUN, workers, "resume=auto", name="interrupted"))
    assert resumed["step"] == 40 and resumed["exit_code"] == 0
    assert_same_run(reference.out_dir, interrupted.out_dir)


def test_max_time_saves_and_exits_124_and_the_resumed_run_is_the_uninterrupted_one(make_config, monkeypatch, caplog):
    reference = make_config(*RUN, name="reference")
    train(reference)
    limited = make_config(*RUN, name="limited")
    # The clock the stop request reads jumps an hour during step 7: the limit passes there, on any machine.
    real_loss, calls, hours = train_module.compute_loss, {"n": 0}, {"passed": 0}

    def an_hour_in_step_7(output, target):
        calls["n"] += 1
        hours["passed"] += calls["n"] == 13  # step 7's first micro-batch (accum_steps=2)
        return real_loss(output, target)

    clock = SimpleNamespace(perf_counter=lambda: time.perf_counter() + 3600 * hours["passed"])
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "compute_loss", an_hour_in_step_7)
        patch.setattr(signals_module, "time", clock)
        assert main(cli(limited.out_dir, *RUN, "max_time_minutes=30")) == 124  # what timeout(1) exits with
    assert checkpoint(limited.out_dir)["step"] == 7  # saved at once, between checkpoints
    marker = (Path(limited.out_dir) / "stopped_by_signal").read_text()
    assert marker == "time limit (max_time_minutes=30) at step 7\n"
    assert "stopped by time limit (max_time_minutes=30) at step 7; last.pt saved" in caplog.text
    assert train(make_config(*RUN, "resume=auto", name="limited"))["exit_code"] == 0
    assert_same_run(reference.out_dir, limited.out_dir)


def stopped_and_resumed(make_config, monkeypatch, run: list[str]) -> tuple[str, str]:
    """The out_dirs of a run, and of the same run stopped by SIGTERM in step 23, then resumed with resume=auto."""
    reference = make_config(*run, name="reference")
    train(reference)
    interrupted = make_config(*run, name="interrupted")
    with monkeypatch.context() as patch:
        signal_during_step(patch, step=23)
        assert train(interrupted)["exit_code"] == 143
    assert checkpoint(interrupted.out_dir)["step"] == 23
    train(make_config(*run, "resume=auto", name="interrupted"))
    return reference.out_dir, interrupted.out_dir


def test_sgd_with_momentum_learns_and_resumes_exactly(make_config, monkeypatch):
    run = [*RUN, "optimizer=sgd", "lr=0.3", "momentum=0.9", "precision=fp32"]  # fp32: no fp16 scale search
    reference, interrupted = stopped_and_resumed(make_config, monkeypatch, run)
    records = run_records(reference)
    assert records == run_records(interrupted)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]  # it learns
    a, b = checkpoint(reference), checkpoint(interrupted)
    assert_same_weights(a["model"], b["model"])
    momentum = [state["momentum_buffer"] for state in a["optimizer"]["state"].values()]
    assert len(momentum) == 5 and all(m.abs().sum() > 0 for m in momentum)
    assert all(m.equal(n["momentum_buffer"]) for m, n in zip(momentum, b["optimizer"]["state"].values(), strict=True))


def test_a_stop_during_evaluation_saves_at_once_and_the_resumed_run_evaluates_first(make_config, monkeypatch):
    run = ["max_steps=20", "warmup_steps=0", "eval_every=10", "ckpt_every=20", "log_every=5", "batch_size=32"]
    reference = make_config(*run, name="reference")
    train(reference)
    interrupted = make_config(*run, name="interrupted")
    sigterm_on_the_third_batch = SignalOnCall(validation_module.metric_totals, 3)
    with monkeypatch.context() as patch:
        patch.setattr(validation_module, "metric_totals", sigterm_on_the_third_batch)
        summary = train(interrupted)
    assert summary["step"] == 10 and summary["exit_code"] == 143
    assert sigterm_on_the_third_batch.calls == 3  # the other 13 batches of the evaluation were not waited for
    assert checkpoint(interrupted.out_dir)["eval_due"] is True
    assert not [r for r in read_metrics(Path(interrupted.out_dir) / "metrics.jsonl") if "val_loss" in r]
    train(make_config(*run, "resume=auto", name="interrupted"))
    assert_same_run(reference.out_dir, interrupted.out_dir)


def test_a_stop_while_the_run_sets_up_is_saved_after_the_first_step(make_config, monkeypatch):
    run = ["max_steps=6", "warmup_steps=0", "eval_every=3", "ckpt_every=6", "log_every=1"]
    reference = make_config(*run, name="reference")
    train(reference)
    interrupted = make_config(*run, name="interrupted")
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "build_datasets", SignalOnCall(train_module.build_datasets, 1))
        summary = train(interrupted)
    assert (summary["step"], summary["exit_code"]) == (1, 143)
    assert (Path(interrupted.out_dir) / "stopped_by_signal").exists() and checkpoint(interrupted.out_dir)["step"] == 1
    train(make_config(*run, "resume=auto", name="interrupted"))
    assert_same_run(reference.out_dir, interrupted.out_dir)


def start_training(
    out_dir: Path, *overrides: str, new_session: bool = False, augment: bool = False
) -> subprocess.Popen:
    """A real training process, its log lines readable as they come; ``augment``: with tests/augment.py."""
    command = [str(ROOT / "tests" / "stand_in_cli.py"), "train", *(["--augment"] if augment else [])]
    return subprocess.Popen(
        [sys.executable, *command, f"out_dir={out_dir}", *overrides],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}, start_new_session=new_session,
    )  # fmt: skip


@pytest.mark.parametrize("num_workers", [0, 2])
def test_kill_9_of_a_real_run_then_resume_is_bit_identical(make_config, augmented, num_workers):
    run = [
        "max_steps=200",
        "accum_steps=2",
        "log_every=10",
        "eval_every=50",
        "ckpt_every=30",
        f"num_workers={num_workers}",
    ]
    reference = make_config(*run, name="reference")
    train(reference)

    out_dir = Path(reference.out_dir).parent / "killed"
    process = start_training(out_dir, *run, augment=True)
    for line in process.stdout:  # kill it mid-run, wherever it happens to be, once a last.pt exists
        if line.startswith("step 70/"):
            process.kill()
            break
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL
    saved_step = checkpoint(out_dir)["step"]
    assert 60 <= saved_step < 200

    summary = train(make_config(*run, "resume=auto", name="killed"))
    assert summary["step"] == 200
    assert_same_run(reference.out_dir, str(out_dir))


@pytest.mark.parametrize(
    ("num_workers", "whole_group"),
    [(0, False), (2, True)],
    ids=["to-the-process", "to-the-process-group-with-workers"],  # the latter is what SLURM and Ctrl-C do
)
def test_sigterm_to_a_real_run_saves_last_pt_and_exits_143(tmp_path, num_workers, whole_group):
    out_dir = tmp_path / "run"
    overrides = ["max_steps=5000", "log_every=10", "ckpt_every=1000", "eval_every=1000", f"num_workers={num_workers}"]
    process = start_training(out_dir, *overrides, new_session=whole_group)
    for line in process.stdout:
        if line.startswith("step 20/"):
            if whole_group:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.send_signal(signal.SIGTERM)
            break
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    stopped_at = checkpoint(out_dir)["step"]
    assert 20 <= stopped_at < 1000  # a last.pt was written at the stop, not at a periodic checkpoint
    assert f"stopped by signal 15 at step {stopped_at}; last.pt saved" in output


def test_second_ctrl_c_exits_at_once(make_config, monkeypatch, capsys):
    cfg = make_config()
    calls = {"n": 0}
    real_loss = train_module.compute_loss

    def loss_with_two_interrupts(output, target):
        calls["n"] += 1
        if calls["n"] in (5, 6):  # both inside optimizer step 3 (accum_steps=2)
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(output, target)

    monkeypatch.setattr(train_module, "compute_loss", loss_with_two_interrupts)
    assert main(cli(cfg.out_dir, "accum_steps=2")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (Path(cfg.out_dir) / "last.pt").exists()


def test_fresh_start_refuses_an_existing_run_unless_told(make_config, capsys):
    cfg = make_config()
    args = cli(cfg.out_dir, "max_steps=3", "warmup_steps=0")
    assert main(args) == 0
    before = (Path(cfg.out_dir) / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "resume=auto" in err and "overwrite=true" in err
    assert (Path(cfg.out_dir) / "last.pt").read_bytes() == before
    assert main([*args, "overwrite=true", "seed=5"]) == 0
    assert checkpoint(cfg.out_dir)["config"]["seed"] == 5


def test_resuming_a_finished_run_says_how_to_extend_it(make_config, caplog):
    train(make_config("max_steps=3", "warmup_steps=0"))
    with caplog.at_level("WARNING"):
        summary = train(make_config("max_steps=3", "warmup_steps=0", "resume=auto"))
    assert summary["step"] == 3 and summary["exit_code"] == 0
    assert "is at step 3, and max_steps is 3: nothing to train (raise max_steps to go on)" in caplog.text
{%- if cookiecutter.loop == "plain" %}


def test_fp16_resume_restores_the_grad_scaler(make_config, monkeypatch):
    # A NaN at step 3 halves the loss scale: a resumed run must go on with the halved scale.
    run = ["precision=fp16", "max_steps=8", "warmup_steps=0", "log_every=1", "ckpt_every=8", "eval_every=8"]
    reference = make_config(*run, name="reference")
    interrupted = make_config(*run, name="interrupted")
    with monkeypatch.context() as patch:
        nan_loss_on(patch, steps={3})
        train(reference)
    with monkeypatch.context() as patch:
        nan_loss_on(patch, steps={3})
        signal_during_step(patch, step=6, accum_steps=1)
        assert train(interrupted)["step"] == 6
    train(make_config(*run, "resume=auto", name="interrupted"))
    assert checkpoint(reference.out_dir)["scaler"]["scale"] < 65536.0
    assert checkpoint(interrupted.out_dir)["scaler"] == checkpoint(reference.out_dir)["scaler"]
    assert_same_weights(checkpoint(interrupted.out_dir)["model"], checkpoint(reference.out_dir)["model"])
{%- endif %}


def test_each_epoch_has_its_own_order(make_config):
    cfg = make_config("batch_size=8")
    data = torch.utils.data.TensorDataset(torch.arange(32), torch.arange(32))
    batches, _ = build_loaders(cfg, data, data, Process())
    epochs = [torch.cat([next(batches)[0] for _ in range(4)]).tolist() for _ in range(3)]
    assert all(sorted(order) == list(range(32)) for order in epochs)  # each epoch sees every sample once
    assert len({tuple(order) for order in epochs}) == 3


class RandomItems(torch.utils.data.Dataset):
    """Each item: its index and a number drawn when it is read (augmentation in miniature)."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int):
        return torch.tensor(index), torch.rand(())


def test_a_dataset_that_reads_whole_batches_still_does(make_config):
    class BatchReads(RandomItems):
        calls = 0

        def __getitems__(self, indices):
            BatchReads.calls += 1
            return [self[index] for index in indices]

    batches, _ = build_loaders(make_config("batch_size=8"), BatchReads(), BatchReads(), Process())
    next(batches)
    assert BatchReads.calls == 1


def test_augmentation_in_workers_differs_per_epoch_and_repeats_per_run(make_config):
    def draws(epochs: int) -> list[list[tuple[int, float]]]:
        """(index, draw) in the order read, per epoch."""
        cfg = make_config("batch_size=8", "num_workers=2")
        batches, _ = build_loaders(cfg, RandomItems(), RandomItems(), Process())
        out = []
        for _ in range(epochs):
            pairs = [next(batches) for _ in range(4)]
            out.append([(int(i), float(x)) for indices, values in pairs for i, x in zip(indices, values, strict=True)])
        return out

    first, again = draws(2), draws(2)
    assert first == again  # a function of the seed, not of the process or the workers' history
    assert all(a[1] != b[1] for a, b in zip(first[0], first[1], strict=True))  # each epoch draws anew, everywhere
    draw_of = [dict(epoch) for epoch in first]
    assert all(draw_of[0][i] != draw_of[1][i] for i in range(32))


def test_resume_auto_starts_fresh_when_there_is_nothing(make_config):
    summary = train(make_config("max_steps=3", "warmup_steps=0", "resume=auto"))
    assert summary["step"] == 3


def test_resume_reports_config_changes_and_allows_a_longer_run(make_config, caplog):
    train(make_config("lr_schedule=step", "max_steps=20"))
    with caplog.at_level("INFO"):
        summary = train(make_config("lr_schedule=step", "max_steps=30", "eval_every=7", "lr=0.02", "resume=auto"))
    assert summary["step"] == 30
    assert "max_steps changed from 20 to 30\n" in caplog.text  # the step schedule does not end: nothing moves
    assert "lr changed from 0.01 to 0.02  (the resumed run will differ" in caplog.text
    assert "resume changed" not in caplog.text


def test_a_longer_cosine_run_keeps_its_schedule_with_decay_steps(make_config, caplog):
    common = ["lr_schedule=warmup_cosine", "warmup_steps=5", "log_every=1"]
    train(make_config(*common, "max_steps=20", name="moved"))
    with caplog.at_level("WARNING"):
        train(make_config(*common, "max_steps=30", "resume=auto", name="moved"))
    assert "max_steps changed from 20 to 30  (the lr schedule now ends at step 30, not 20" in caplog.text
    assert "decay_steps=20 keeps it" in caplog.text

    train(make_config(*common, "max_steps=20", name="kept"))
    caplog.clear()
    with caplog.at_level("WARNING"):
        cfg = make_config(*common, "max_steps=30", "decay_steps=20", "resume=auto", name="kept")
        train(cfg)
    assert "will differ" not in caplog.text
    lrs = [r["lr"] for r in train_records(cfg.out_dir)]
    assert lrs[19] == pytest.approx(lr_at(19, make_config(*common, "max_steps=20")))  # as the 20-step run had it
    assert lrs[20:] == pytest.approx([cfg.min_lr] * 10)  # past its end, the schedule holds min_lr


def test_a_wsd_run_resumed_with_more_steps_before_its_cooldown_is_extended_exactly(make_config, monkeypatch, caplog):
    common = ["lr_schedule=wsd", "warmup_steps=5", "cooldown_steps=10", "log_every=1", "eval_every=10"]
    longer = make_config(*common, "max_steps=60", name="longer")  # asked for 60 steps from the start
    train(longer)
    with monkeypatch.context() as patch:  # a 40-step run, stopped at step 20: before its cooldown (from step 30)
        signal_during_step(patch, 20, accum_steps=1)
        assert train(make_config(*common, "max_steps=40", name="extended"))["step"] == 20
    caplog.clear()
    with caplog.at_level("WARNING"):
        extended = make_config(*common, "max_steps=60", "resume=auto", name="extended")
        train(extended)
    assert "max_steps changed from 40 to 60  (wsd: step 20 is before the cooldown, which now starts at step 50" in (
        caplog.text
    )
    assert "will differ" not in caplog.text
    assert run_records(extended.out_dir) == run_records(longer.out_dir)
    assert_same_weights(checkpoint(extended.out_dir)["model"], checkpoint(longer.out_dir)["model"])


def older_format(path: Path) -> None:
    """The checkpoint as the previous format (v2) labelled it."""
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "format": checkpoint_module.FORMAT.replace("-v3", "-v2")}, path)


def bit_flipped(path: Path) -> None:
    """One bit of the checkpoint's pickle changed, where weights_only's reader stops on it (a disk's error)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = next(info for info in archive.infolist() if info.filename.endswith("data.pkl"))
    start = record.header_offset + 30 + len(record.filename) + len(record.extra)  # the record's bytes
    for offset in range(start, start + record.compress_size):
        flipped = bytearray(data)
        flipped[offset] ^= 0x40
        path.write_bytes(flipped)
        try:
            torch.load(path, weights_only=True)
        except pickle.UnpicklingError:
            return
        except Exception:  # noqa: BLE001 (another kind of damage: try the next byte)
            pass
    raise AssertionError("no flipped bit made weights_only's reader stop")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "is unreadable: not a whole torch.save"),
        (bit_flipped, "is unreadable: a damaged torch.save file"),
        (lambda p: p.write_bytes(b"not a checkpoint at all"), "is unreadable: not a whole torch.save file"),
        (lambda p: p.write_text("epoch,loss\n"), "is unreadable: not a whole torch.save file"),
        (lambda p: torch.save({"model": {}}, p), "is not a checkpoint of this project"),
        (lambda p: torch.save(torch.nn.Linear(2, 2), p), "is refused: it holds Python objects besides tensors"),
        (older_format, "was saved by another version of this project (format v2; this one reads v3): resume or"),
    ],
    ids=["truncated", "bit-flipped", "garbage", "text", "another-project", "pickled-module", "older-format"],
)
def test_a_damaged_checkpoint_is_reported_and_left_alone(make_config, capsys, damage, message):
    cfg = make_config("max_steps=3", "warmup_steps=0")
    train(cfg)
    last = Path(cfg.out_dir) / "last.pt"
    damage(last)
    damaged = last.read_bytes()
    metrics = (Path(cfg.out_dir) / "metrics.jsonl").read_bytes()
    assert main(cli(cfg.out_dir, "resume=auto")) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {last}") or err.startswith(f"error: {last}")
    assert message in err and err.count("\n") == 1 and "\x1b" not in err and "weights_only=False" not in err
    assert last.read_bytes() == damaged and (Path(cfg.out_dir) / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.parametrize(
    ("change", "message"),
    [("rename", "missing 1.weight; unexpected 1.weights"), ("drop", "missing 1.weight"),
     ("add", "unexpected extra.weight")],
)  # fmt: skip
def test_a_checkpoint_whose_keys_do_not_match_the_model_is_one_line(make_config, capsys, change, message):
    cfg = make_config("max_steps=2", "warmup_steps=0")
    train(cfg)
    last = Path(cfg.out_dir) / "last.pt"
    saved = torch.load(last, weights_only=True)
    weights = saved["model"]
    if change == "rename":
        weights["1.weights"] = weights.pop("1.weight")
    elif change == "drop":
        del weights["1.weight"]
    else:
        weights["extra.weight"] = torch.zeros(2)
    save_checkpoint(saved, last)
    before = last.read_bytes()
    assert main(cli(cfg.out_dir, "max_steps=4", "warmup_steps=0", "resume=auto")) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {last} does not fit the model built from the config: {message}")
    assert err.count("\n") == 1 and last.read_bytes() == before


def test_max_time_minutes_stops_at_the_start_plus_60_seconds_a_minute(make_config, monkeypatch):
    # A fake clock, read by the loop and by the stop request: one minute per step (accum_steps=1).
    real_loss, minutes = train_module.compute_loss, {"passed": 0}

    def a_minute_a_step(output, target):
        minutes["passed"] += 1
        return real_loss(output, target)

    clock = SimpleNamespace(perf_counter=lambda: 60.0 * minutes["passed"])
    monkeypatch.setattr(train_module, "compute_loss", a_minute_a_step)
    monkeypatch.setattr(train_module, "time", clock)
    monkeypatch.setattr(signals_module, "time", clock)
    summary = train(make_config("max_steps=100", "warmup_steps=0", "max_time_minutes=7", "log_every=1000",
                                "eval_every=1000", "ckpt_every=1000"))  # fmt: skip
    assert (summary["step"], summary["exit_code"]) == (7, 124)  # 7 minutes after the start, not 7 seconds


def test_a_checkpoint_of_another_model_shape_is_reported(make_config, monkeypatch, capsys):
    cfg = make_config("max_steps=3", "warmup_steps=0")
    train(cfg)
    last = Path(cfg.out_dir) / "last.pt"
    before = last.read_bytes()
    monkeypatch.setattr(stand_in, "WIDTH", 8)  # as if the model's width had been changed since
    assert main(cli(cfg.out_dir, "resume=auto")) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {last} does not fit the model" in err and "(16, 32) in the file but (16, 8)" in err
    assert last.read_bytes() == before


def test_a_crash_inside_a_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    def write_half_then_fail(obj, tmp):
        Path(tmp).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", write_half_then_fail)
    with pytest.raises(CheckpointError, match="could not save .*last.pt: No space left on device"):
        save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
{%- if cookiecutter.loop == "plain" %}


def test_a_crash_inside_a_sharded_save_leaves_the_previous_one_to_resume_from(make_config, monkeypatch, capsys):
    # parallel=fsdp (here in one process): the latest state is the folder last/, committed by last/latest.
    run = ["parallel=fsdp", "max_steps=10", "ckpt_every=5", "eval_every=100", "log_every=5"]
    reference = make_config(*run, name="reference")
    train(reference)
    cfg = make_config(*run, name="crashed")
    real_save, saves = checkpoint_module.dcp.save, []

    def save_then_crash(*args, **kwargs):
        saves.append(kwargs["checkpoint_id"])
        real_save(*args, **kwargs)
        if len(saves) == 2:  # step 10's shards are on disk, not committed yet
            raise RuntimeError("the process was killed")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module.dcp, "save", save_then_crash)
        assert main(cli(cfg.out_dir, *run)) == 1
    assert "could not save" in capsys.readouterr().err
    last = Path(cfg.out_dir) / "last"
    assert (last / "latest").read_text() == "step-00000005\n" and (last / "step-00000010").exists()
    assert checkpoint_module.read_sharded(last)["step"] == 5
    assert train(make_config(*run, "resume=auto", name="crashed"))["step"] == 10
    assert sorted(p.name for p in last.iterdir()) == ["latest", "step-00000010"]  # the committed one only
    _, expected = sharded_weights(Path(reference.out_dir) / "last")
    for key, value in sharded_weights(last)[1].items():
        assert torch.equal(value, expected[key]), key
{%- endif %}


def test_a_full_disk_during_a_save_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    before = path.read_bytes()
    real_save = torch.save
    # What torch.save raises when the disk fills up: a RuntimeError from its zip writer (as writing to /dev/full does).
    monkeypatch.setattr(checkpoint_module.torch, "save", lambda obj, tmp: real_save(obj, "/dev/full"))
    with pytest.raises(CheckpointError, match="could not save .*last.pt: writing failed \\(is the disk full\\?\\)"):
        save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_checkpoints_follow_the_umask_like_any_file(tmp_path):
    previous = os.umask(0o027)
    try:
        save_checkpoint({"step": 1}, tmp_path / "last.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o640


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names file descriptors through /proc/self/fd")
def test_a_save_reaches_the_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint_module.os, "replace", replace)
    save_checkpoint({"step": 1}, tmp_path / "last.pt")
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].endswith(".tmp")  # the new bytes, under their temporary name
    assert events[2][1] == str(tmp_path)  # the folder: the rename itself is durable


@pytest.mark.skipif(os.name != "posix", reason="Windows cannot replace a mapped file: loaded without mmap there")
def test_checkpoints_load_memory_mapped(tmp_path, monkeypatch):
    # Under torchrun every rank loads the checkpoint: mapped, not a whole copy in each process's memory.
    save_checkpoint({"model": {}, "optimizer": {}, "scheduler": {}, "scaler": {}, "config": {}, "step": 0,
                     "best_metric": None}, tmp_path / "last.pt")  # fmt: skip
    calls = []
    real_load = torch.load
    monkeypatch.setattr(checkpoint_module.torch, "load", lambda *a, **k: (calls.append(k), real_load(*a, **k))[1])
    checkpoint_module.load_checkpoint(tmp_path / "last.pt")
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]


def test_a_checkpoint_holding_an_arbitrary_object_is_refused(tmp_path):
    # weights_only=True: loading never runs code from the file, so an object of any class is an error.
    path = tmp_path / "last.pt"
    torch.save({"format": checkpoint_module.FORMAT, "model": {}, "payload": threading.Lock}, path)
    with pytest.raises(CheckpointError, match="is refused: it holds Python objects"):
        checkpoint_module.load_checkpoint(path)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc/self/fd")
def test_replacing_a_checkpoint_leaves_no_file_open(tmp_path, monkeypatch):
    def open_files() -> int:
        for thread in threading.enumerate():  # the old file is closed off the calling thread
            if thread.name == "release-old-checkpoint":
                thread.join()
        return len(os.listdir("/proc/self/fd"))

    path = tmp_path / "last.pt"
    save_checkpoint({"step": 0}, path)
    before = open_files()
    for step in range(1, 6):
        save_checkpoint({"step": step}, path)
    assert open_files() == before

    def fail_to_rename(*args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(checkpoint_module.os, "replace", fail_to_rename)
    with pytest.raises(CheckpointError, match="I/O error"):
        save_checkpoint({"step": 6}, path)
    assert open_files() == before
    assert torch.load(path, weights_only=True)["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_a_failed_save_during_training_stops_with_a_clear_error(make_config, monkeypatch, capsys, async_save):
    cfg = make_config("max_steps=30", "ckpt_every=10", "eval_every=100")
    real_replace = os.replace
    calls = {"n": 0}

    def replace_fails_second_time(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise PermissionError(errno.EACCES, "Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", replace_fails_second_time)
    code = main(cli(cfg.out_dir, "max_steps=30", "ckpt_every=10", "eval_every=100", f"async_save={async_save}"))
    assert code == 1
    assert "could not save" in capsys.readouterr().err
    assert checkpoint(cfg.out_dir)["step"] == 10  # the previous last.pt, intact
    # In the background, step 20's failed write is known at the next save (step 30's, after its evaluation).
    files = [".lock", "config.yaml", "last.pt", "metrics.jsonl", *(["best.pt"] if async_save == "true" else [])]
    assert sorted(p.name for p in Path(cfg.out_dir).iterdir()) == sorted(files)

{%- if cookiecutter.loop == "plain" %}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
{%- else %}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # fp16: a GPU's (Accelerate runs it as fp32 on the CPU)
{%- endif %}
def test_a_non_finite_step_is_skipped_and_logged(make_config, monkeypatch, caplog, precision):
    nan_loss_on(monkeypatch, steps={7})
    cfg = make_config(f"precision={precision}", "max_steps=20", "log_every=5")
    with caplog.at_level("WARNING"):
        summary = train(cfg)
    assert summary["step"] == 20
    assert "non-finite loss or gradients at step(s) [7]" in caplog.text
    assert train_records(cfg.out_dir)[1]["skipped"] >= 1  # the record of steps 6-10
    skipped = sum(r["skipped"] for r in train_records(cfg.out_dir))
    assert first_moments(checkpoint(cfg.out_dir))["step"] == 20 - skipped  # the skip moved nothing
    if precision == "fp16":  # the GradScaler saw the overflow too, and lowered its scale
        assert checkpoint(cfg.out_dir)["scaler"]["scale"] < 65536.0


def test_an_inf_loss_with_finite_gradients_is_bad_but_stepped(make_config, monkeypatch, caplog):
    # Finite gradients cannot corrupt the weights, and they are what every DDP rank shares: the skip
    # follows them alone. The loss still counts as bad (max_bad_steps in a row stop the run).
    nan_loss_on(monkeypatch, steps={3}, finite_gradients=True)
    cfg = make_config("precision=fp32", "max_steps=6", "warmup_steps=0", "log_every=1")
    with caplog.at_level("WARNING"):
        assert train(cfg)["skipped_steps"] == 0
    assert "non-finite loss or gradients at step(s) [3]" in caplog.text
    records = train_records(cfg.out_dir)
    assert [r["skipped"] for r in records] == [0] * 6 and "loss" not in records[2]  # no inf in the mean
    assert first_moments(checkpoint(cfg.out_dir))["step"] == 6


@pytest.mark.parametrize("fp16", [False, True])
def test_an_overflow_is_bad_except_for_fp16s_scale_search(fp16):
    steps = StepLog()
    for loss, grad_norm in [(0.5, 1.0), (0.5, math.inf), (0.5, math.inf), (0.25, 1.0), (math.nan, math.nan)]:
        steps.add(torch.tensor(2 * loss), torch.tensor(2.0), torch.tensor(grad_norm), lr=0.1)  # (sum, count): steps 1-5
    if not fp16:  # steps 2 and 3 overflowed: two bad steps in a row
        with pytest.raises(TrainingError, match=r"2 consecutive steps .* \(last at step 3\)"):
            steps.read(last_step=5, fp16=False, max_bad_steps=2)
        return
    steps.read(last_step=5, fp16=True, max_bad_steps=2)  # fp16's GradScaler overflows on purpose: skipped, not bad
    assert steps.skipped_total == 3 and steps.bad_streak == 1  # a NaN loss (step 5) is bad with fp16 too
    assert steps.record(step=5) == {"step": 5, "lr": 0.1, "skipped": 3, "loss": 0.375, "grad_norm": 1.0}
    assert steps.record(step=6) == {"step": 6, "lr": 0.1, "skipped": 0}  # each record: the steps since the last


def test_repeated_non_finite_steps_stop_training_and_keep_the_checkpoints(make_config, monkeypatch, capsys):
    saved = record_saves(monkeypatch)
    nan_loss_on(monkeypatch, from_step=13)
    cfg = make_config("max_steps=40", "log_every=1", "ckpt_every=2", "eval_every=2", "max_bad_steps=3")
    with pytest.raises(
        TrainingError, match=r"3 consecutive steps with a non-finite loss or gradient \(last at step 15\)"
    ):
        train(cfg)
    assert max(step for _, step in saved) == 12
    assert checkpoint(cfg.out_dir)["step"] == 12
    assert checkpoint(cfg.out_dir, "best.pt")["step"] <= 12


# One run per folder: rank 0 holds an OS lock on out_dir while the run lives.
def test_a_second_start_in_a_busy_out_dir_is_refused_and_the_first_run_finishes_untouched(make_config, capsys):
    run = ["max_steps=400", "log_every=10", "eval_every=100", "ckpt_every=100"]
    reference = make_config(*run, name="reference")
    train(reference)
    out_dir = Path(reference.out_dir).parent / "busy"
    process = start_training(out_dir, *run)
    for line in process.stdout:  # the lock is taken before set-up: held by now
        if line.startswith("step 10/"):
            break
    for second in (["resume=auto"], ["overwrite=true"]):
        assert main(cli(out_dir, *run, *second)) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: out_dir {out_dir} is in use by another run (pid {process.pid} on "), error
        assert error.endswith(": wait for it to end, stop it, or use another out_dir\n") and error.count("\n") == 1
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert run_records(out_dir) == run_records(reference.out_dir)
    assert_same_weights(checkpoint(out_dir)["model"], checkpoint(reference.out_dir)["model"])


def test_after_a_kill_9_the_out_dir_is_free_again(make_config):
    out_dir = Path(make_config().out_dir).parent / "killed"
    process = start_training(out_dir, "max_steps=400", "log_every=10")
    for line in process.stdout:
        if line.startswith("step 10/"):
            process.kill()
            break
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL
    assert train(make_config("max_steps=20", "overwrite=true", name="killed"))["step"] == 20


def test_srun_tasks_without_torchrun_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(cli(tmp_path / "run")) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: srun started 8 tasks of this command without torchrun") and error.count("\n") == 1
    assert "srun --ntasks-per-node=1 torchrun --nproc_per_node=GPUS -m" in error
    assert not (tmp_path / "run").exists()


# last.pt in the background (async_save): on a slow disk (each fsync 0.25 s longer; a save makes two) the step
# waits only for a copy.
SLOW_FSYNC = 0.25


def test_a_save_in_the_background_blocks_the_step_a_small_fraction_of_a_foreground_write(make_config, monkeypatch):
    monkeypatch.setattr(os, "fsync", slowed(os.fsync, SLOW_FSYNC))
    real_loss = train_module.compute_loss

    def a_step_of_60_ms(output, target):  # time between saves for a write to end in (10 steps: 0.6 s)
        time.sleep(0.06)
        return real_loss(output, target)

    monkeypatch.setattr(train_module, "compute_loss", a_step_of_60_ms)
    blocked = {}
    real_save = checkpoint_module.LastCheckpoint.save
    for async_save in ("false", "true"):
        seconds = blocked[async_save] = []

        def timed(self, state, seconds=seconds):
            started = time.perf_counter()
            real_save(self, state)
            seconds.append(time.perf_counter() - started)

        monkeypatch.setattr(checkpoint_module.LastCheckpoint, "save", timed)
        run = ["max_steps=30", "ckpt_every=10", "eval_every=100", f"async_save={async_save}"]
        cfg = make_config(*run, name=async_save)
        train(cfg)
        assert checkpoint(cfg.out_dir)["step"] == 30
    foreground, background = (sum(blocked[a][:2]) / 2 for a in ("false", "true"))  # steps 10 and 20
    print(f"seconds blocked per save of last.pt: {foreground:.3f} in the foreground, {background:.3f} in the back")
    assert foreground >= SLOW_FSYNC and background < 0.2 * foreground
    assert_same_weights(checkpoint(Path(cfg.out_dir).parent / "false")["model"], checkpoint(cfg.out_dir)["model"])


def test_kill_9_during_a_background_write_resumes_bit_exact_from_the_previous_last(make_config, monkeypatch):
    run = ["max_steps=60", "log_every=20", "eval_every=100", "ckpt_every=20"]
    reference = make_config(*run, name="reference")
    train(reference)
    out_dir = Path(reference.out_dir).parent / "killed"
    monkeypatch.setenv("STAND_IN_SLOW_FSYNC", "3")
    process = start_training(out_dir, *run)
    for line in process.stdout:
        if line.startswith("step 40/"):  # step 40's save waits for step 20's write, then starts its own
            break
    while not ((out_dir / "last.pt").exists() and list(out_dir.glob(".last.pt.*.tmp"))):
        time.sleep(0.01)
    process.kill()  # step 40's write is in flight: its fsync alone takes 3 s
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL
    assert checkpoint(out_dir)["step"] == 20  # the previous last.pt, whole
    train(make_config(*run, "resume=auto", name="killed"))
    assert run_records(out_dir) == run_records(reference.out_dir)
    assert_same_weights(checkpoint(out_dir)["model"], checkpoint(reference.out_dir)["model"])


def test_sigterm_during_a_background_write_exits_143_once_the_write_is_committed(make_config, monkeypatch):
    out_dir = Path(make_config().out_dir).parent / "stopped"
    monkeypatch.setenv("STAND_IN_SLOW_FSYNC", "2")
    process = start_training(out_dir, "max_steps=400", "log_every=20", "eval_every=1000", "ckpt_every=20")
    for line in process.stdout:
        if line.startswith("step 40/"):  # step 40's write takes over 2 s; the stop's own save waits for it
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            break
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    saved = checkpoint(out_dir)
    assert 40 < saved["step"] < 400 and (out_dir / "stopped_by_signal").exists()
    assert not list(out_dir.glob(".last.pt.*.tmp"))  # committed: no write was cut short


def test_a_run_killed_after_records_past_its_checkpoint_resumes_to_the_same_metrics(make_config, monkeypatch):
    run = ["max_steps=60", "log_every=5", "eval_every=100", "ckpt_every=20"]
    reference = make_config(*run, name="reference")
    train(reference)
    cfg = make_config(*run, name="killed")
    with monkeypatch.context() as patch:  # the run dies in step 33: last.pt holds step 20, metrics.jsonl step 30
        patch.setattr(train_module, "compute_loss", FailOnCall(train_module.compute_loss, 33, "a run killed"))
        with pytest.raises(InjectedFailure):
            train(cfg)
    metrics = Path(cfg.out_dir) / "metrics.jsonl"
    assert checkpoint(cfg.out_dir)["step"] == 20 and read_metrics(metrics)[-1]["step"] == 30
    with metrics.open("a") as file:
        file.write('{"step": 35, "lo')  # a line a kill tore
    train(make_config(*run, "resume=auto", name="killed"))
    assert run_records(cfg.out_dir) == run_records(reference.out_dir)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_step_whose_gradients_are_infinite_but_not_nan_is_skipped(make_config, monkeypatch, precision):
    real_build = train_module.build_model

    def with_an_infinite_gradient_in_step_7(cfg):
        model, calls = real_build(cfg), {"n": 0}

        def hook(grad):
            calls["n"] += 1
            return grad.index_fill(0, torch.tensor([0]), math.inf) if calls["n"] == 7 else grad

        model[-1].bias.register_hook(hook)
        return model

    monkeypatch.setattr(train_module, "build_model", with_an_infinite_gradient_in_step_7)
    cfg = make_config(f"precision={precision}", "max_steps=20", "log_every=5")
    train(cfg)
    assert [r["skipped"] for r in train_records(cfg.out_dir)] == [0, 1, 0, 0]
    assert first_moments(checkpoint(cfg.out_dir))["step"] == 19


def test_a_run_with_weight_ema_resumes_its_average_bit_exact(make_config, monkeypatch):
    reference, interrupted = stopped_and_resumed(make_config, monkeypatch, [*RUN, "ema_decay=0.9", "ema_start=5"])
    assert_same_run(reference, interrupted)  # evaluations (of the average) and best.pt included
    assert_same_weights(checkpoint(reference)["ema"], checkpoint(interrupted)["ema"])


def test_muon_learns_and_resumes_exactly(make_config, monkeypatch):
    run = [*RUN, "optimizer=muon", "lr=0.02", "precision=fp32"]
    reference, interrupted = stopped_and_resumed(make_config, monkeypatch, run)
    records = run_records(reference)
    assert records == run_records(interrupted)
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"muon: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.7 * losses[0]  # it learns
    a, b = checkpoint(reference), checkpoint(interrupted)
    assert_same_weights(a["model"], b["model"])
    # Muon's momentum for the hidden matrix (1.weight: the embedding and the output layer are AdamW's), AdamW's
    # moments for the rest, each by name, each resumed bit-exact.
    kinds = {name: sorted(state) for name, state in a["optimizer"]["state"].items()}
    assert kinds["1.weight"] == ["momentum_buffer"] and kinds["0.weight"] == kinds["4.weight"] == [
        "exp_avg", "exp_avg_sq", "step"]  # fmt: skip
    for name, state in a["optimizer"]["state"].items():
        assert all(value.equal(b["optimizer"]["state"][name][key]) for key, value in state.items()), name
