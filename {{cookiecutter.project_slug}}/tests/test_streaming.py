"""An iterable training set (a stream): each process and worker reads its own part, and a stopped run resumes
bit-exact, by the dataset's own state_dict() or by reading again what it had read."""

from __future__ import annotations

import itertools
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from {{ cookiecutter.package_name }}.essentials import validation as validation_module
from {{ cookiecutter.package_name }}.essentials.config import ConfigError
from {{ cookiecutter.package_name }}.essentials.precision import Precision
from {{ cookiecutter.package_name }}.essentials.validation import evaluate
from {{ cookiecutter.package_name }}.machinery.distributed import Process, evaluation_agreement
from {{ cookiecutter.package_name }}.machinery.loader import SeededStream, build_loaders, init_worker
from {{ cookiecutter.package_name }}.train import main, train

from . import stand_in
from .conftest import checkpoint, cli, eval_records
from .test_resume import RUN, assert_same_run, signal_during_step, start_training

KINDS = ["plain", "stateful"]  # without state_dict (read again on resume), and with it


@pytest.fixture
def stream(monkeypatch):
    """The tests' task with its training set as a stream; ``stream(kind)`` picks the kind. Returns the indices
    read in this process (without workers: every one), emptied at each call."""

    def use(kind: str) -> list[int]:
        monkeypatch.setattr(stand_in, "STREAM", kind)
        monkeypatch.setattr(stand_in.SequenceStream, "read", [])
        return stand_in.SequenceStream.read

    return use


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_epoch_reads_every_sample_once_in_its_own_order(make_config, stream, num_workers):
    cfg = make_config("batch_size=32", f"num_workers={num_workers}")
    numbered = torch.utils.data.TensorDataset(torch.zeros(1024, stand_in.MAX_LEN, dtype=torch.long), torch.arange(1024))
    batches, _ = build_loaders(cfg, stand_in.SequenceStream(numbered, seed=0), numbered, Process())
    epochs = [torch.cat([next(batches)[1] for _ in range(32)]).tolist() for _ in range(2)]  # targets: the indices
    assert all(sorted(epoch) == list(range(1024)) for epoch in epochs)
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_mid_epoch_then_resume_is_bit_identical(make_config, monkeypatch, stream, kind, num_workers):
    stream(kind)
    run = [*RUN, f"num_workers={num_workers}"]
    reference = make_config(*run, name="reference")
    train(reference)
    interrupted = make_config(*run, name="interrupted")
    with monkeypatch.context() as patch:
        signal_during_step(patch, step=23)  # epoch 1 (32 batches an epoch, 2 per step), between checkpoints
        assert train(interrupted)["exit_code"] == 128 + signal.SIGTERM
    positions = checkpoint(interrupted.out_dir)["data"]["stream"]  # one process, its workers' positions
    assert [len(workers) for workers in positions] == [max(num_workers, 1)]
    assert sum(p["batch"] for p in positions[0]) == 46 - 32 and {p["epoch"] for p in positions[0]} == {1}
    assert all((p["dataset"] is not None) == (kind == "stateful") for p in positions[0])

    read = stream(kind)
    assert train(make_config(*run, "resume=auto", name="interrupted"))["exit_code"] == 0
    assert_same_run(reference.out_dir, interrupted.out_dir)
    if num_workers == 0:  # the batches of the resumed run, 17 steps of 2, and what it read to get there
        read_again = 14 * 32 if kind == "plain" else 0
        assert len(read) == read_again + 34 * 32


@pytest.mark.parametrize(("kind", "num_workers"), [("plain", 2), ("stateful", 0)])  # SIGTERM: all four, above
def test_kill_9_of_a_real_run_then_resume_is_bit_identical(make_config, monkeypatch, stream, kind, num_workers):
    stream(kind)
    monkeypatch.setenv("STAND_IN_STREAM", kind)  # for the process the test kills
    run = [
        "max_steps=120",
        "accum_steps=2",
        "log_every=10",
        "eval_every=50",
        "ckpt_every=30",
        f"num_workers={num_workers}",
    ]
    reference = make_config(*run, name="reference")
    train(reference)
    out_dir = Path(reference.out_dir).parent / "killed"
    process = start_training(out_dir, *run)
    for line in process.stdout:  # once a last.pt exists, wherever the run happens to be
        if line.startswith("step 70/"):
            process.kill()
            break
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL
    assert 60 <= checkpoint(out_dir)["step"] < 120
    assert train(make_config(*run, "resume=auto", name="killed"))["step"] == 120
    assert_same_run(reference.out_dir, str(out_dir))


def test_the_datas_random_draws_leave_the_training_streams_alone(make_config, stream):
    stream("plain")  # draws from torch, NumPy and Python as it is read, in this process (no workers)
    cfg = make_config()
    train_set, val_set = stand_in.build_datasets(cfg)
    batches, _ = build_loaders(cfg, train_set, val_set, Process())
    torch.manual_seed(1)
    next(batches)
    after_a_batch = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_a_batch)


def test_the_start_block_says_how_the_stream_resumes(make_config, stream, caplog):
    for kind, name, says in [
        ("plain", "SequenceStream", "reading again the batches already trained on"),
        ("stateful", "StatefulSequenceStream", "its own state_dict()"),
    ]:
        stream(kind)
        caplog.clear()
        with caplog.at_level("INFO"):
            train(make_config("max_steps=2", "warmup_steps=0", "overwrite=true"))
        assert f"data:       an iterable training set ({name}, 1 part(s) per process)" in caplog.text
        assert f"a resumed run continues it by {says}" in caplog.text


def test_resuming_a_stream_with_other_workers_is_one_line(make_config, stream, capsys):
    stream("plain")
    cfg = make_config()
    assert main(cli(cfg.out_dir, "max_steps=4", "warmup_steps=0", "num_workers=0")) == 0
    capsys.readouterr()
    assert main(cli(cfg.out_dir, "max_steps=8", "warmup_steps=0", "num_workers=2", "resume=auto")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "continues exactly only as it was read, by 1 process(es) x 1 worker(s) each; now 1 x 2" in err


def test_a_stream_too_short_for_a_batch_is_one_line(make_config, stream, monkeypatch, capsys):
    stream("plain")
    monkeypatch.setattr(stand_in, "TRAIN_SIZE", 40)  # 20 a worker: fewer than a batch of 32
    assert main(cli(make_config().out_dir, "num_workers=2")) == 2
    err = capsys.readouterr().err
    assert err == "error: the training set gave worker 0 of process 0 fewer than batch_size=32 samples in an epoch\n"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_iterable_validation_set_measures_what_the_same_samples_do_map_style(make_config, monkeypatch, num_workers):
    run = ["max_steps=4", "warmup_steps=0", "eval_every=2", "log_every=2", f"num_workers={num_workers}"]
    train(make_config(*run, name="map"))
    monkeypatch.setattr(stand_in, "VAL_STREAM", True)
    train(make_config(*run, name="stream"))
    evaluations = [eval_records(make_config(name=name).out_dir) for name in ("map", "stream")]
    assert [r["step"] for r in evaluations[1]] == [2, 4]
    if num_workers == 0:  # the same batches, in the same order
        assert evaluations[0] == evaluations[1]
    else:  # each worker batches its half: other batches, the same samples
        for a, b in zip(*evaluations, strict=True):
            assert all(b[key] == pytest.approx(a[key], rel=1e-6) for key in a)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_max_eval_batches_caps_an_iterable_validation_set_at_as_many_samples(make_config, monkeypatch, num_workers):
    seen = []

    def spy(output, target, task):
        seen.append(len(target))
        return stand_in.metric_totals(output, target, task)

    monkeypatch.setattr(validation_module, "metric_totals", spy)
    monkeypatch.setattr(stand_in, "VAL_STREAM", True)
    run = ["max_steps=2", "warmup_steps=0", "eval_every=2", "log_every=2", f"num_workers={num_workers}"]
    train(make_config(*run, "max_eval_batches=3"))
    assert sum(seen) == 3 * 32  # 3 batches' worth; with 2 workers, 48 samples each: batches of 32 and 16
    assert sorted(seen) == ([32] * 3 if num_workers == 0 else [16, 16, 32, 32])


def test_an_empty_part_of_an_iterable_validation_set_is_one_line(make_config, monkeypatch):
    # What evaluation_agreement hears under torchrun when this process has a first batch and another has none.
    another_without = SimpleNamespace(agree_max_each=lambda values: [values[0], 1, 1])
    monkeypatch.setattr(stand_in, "VAL_STREAM", True)
    cfg = make_config()
    _, val_loaders = build_loaders(cfg, *stand_in.build_datasets(cfg), Process())
    go_on = evaluation_agreement(another_without)
    with pytest.raises(ConfigError, match="^a process had no validation batch: every process's part of an iterable"):
        evaluate(
            stand_in.build_model(cfg), val_loaders[""], torch.device("cpu"), Precision("fp32", "cpu"), cfg.task, go_on
        )


class Draws(IterableDataset):
    """An epoch of 4 samples, each the random number drawn as it is read: what augmentation draws, read back."""

    def __iter__(self):
        return (torch.rand(()) for _ in range(4))


def draws_by_batch(rank: int) -> dict[tuple[int, int, int], list[float]]:
    """(worker, epoch, batch) -> the draws of that batch of 2, as 2 DataLoader workers of ``rank`` read it."""
    stream = SeededStream(Draws(), batch_size=2, seed=0, rank=rank)
    loader = DataLoader(stream, batch_size=None, num_workers=2, worker_init_fn=init_worker)
    return {(p["worker"], p["epoch"], p["batch"]): batch.tolist() for batch, p in itertools.islice(loader, 16)}


def test_a_streams_random_draws_differ_by_worker_epoch_and_rank_and_repeat_exactly():
    rank_0, rank_1 = draws_by_batch(0), draws_by_batch(1)
    first = rank_0[(0, 0, 1)]  # worker 0, epoch 0, its first batch
    assert first != rank_0[(1, 0, 1)]  # another worker
    assert first != rank_0[(0, 1, 1)]  # another epoch
    assert first != rank_1[(0, 0, 1)]  # another process
    assert rank_0 == draws_by_batch(0)  # a function of where the batch is, not of history
