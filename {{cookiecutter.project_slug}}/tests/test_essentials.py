"""Seed, accumulation, clipping, schedule, validation + best checkpoint: each proven, not just run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from {{ cookiecutter.package_name }} import train as train_module
from {{ cookiecutter.package_name }}.essentials import validation as validation_module
{%- if cookiecutter.loop == "plain" %}
from {{ cookiecutter.package_name }}.essentials.clipping import clip_gradients
{%- endif %}
from {{ cookiecutter.package_name }}.essentials.config import ConfigError, load_config
from {{ cookiecutter.package_name }}.essentials.ema import WeightEMA
from {{ cookiecutter.package_name }}.essentials.optimizer import build_optimizer, hidden_matrices
from {{ cookiecutter.package_name }}.essentials.precision import Precision
from {{ cookiecutter.package_name }}.essentials.schedule import build_scheduler, lr_at
from {{ cookiecutter.package_name }}.essentials.validation import evaluate
from {{ cookiecutter.package_name }}.evaluate import evaluate_checkpoint
from {{ cookiecutter.package_name }}.machinery.loader import ShardSampler
from {{ cookiecutter.package_name }}.machinery.metrics import read_metrics, tag
from {{ cookiecutter.package_name }}.train import main, train

from . import stand_in
from .conftest import (
    ROOT,
    assert_same_weights,
    before_each_step,
    checkpoint,
    cli,
    eval_records,
    first_moments,
    nan_loss_on,
    record_saves,
    run_records,
    train_records,
)


def losses(out_dir) -> list[float | None]:
    return [r.get("loss") for r in train_records(out_dir)]  # None: a skipped step (fp16's first few)


# --- 2. seed ---


def test_same_seed_gives_the_same_loss_curve_bit_for_bit(make_config):
    a = make_config("max_steps=30", "log_every=1", name="a")
    b = make_config("max_steps=30", "log_every=1", name="b")
    train(a)
    train(b)
    assert losses(a.out_dir) == losses(b.out_dir)
    assert_same_weights(checkpoint(a.out_dir)["model"], checkpoint(b.out_dir)["model"])


def test_different_seed_gives_a_different_curve(make_config):
    a = make_config("max_steps=10", "log_every=1", name="a")
    b = make_config("max_steps=10", "log_every=1", "seed=1", name="b")
    train(a)
    train(b)
    assert losses(a.out_dir) != losses(b.out_dir)


def test_evaluation_does_not_disturb_the_training_randomness(make_config):
    # Dropout draws from the global RNG; evaluating (however often) must not move it.
    rare = make_config("max_steps=30", "log_every=1", "eval_every=1000", name="rare")
    often = make_config("max_steps=30", "log_every=1", "eval_every=3", name="often")
    train(rare)
    train(often)
    assert losses(rare.out_dir) == losses(often.out_dir)


# --- accumulation ---


def test_accumulation_equals_one_big_batch_token_for_token(make_config, no_dropout):
    # The tests' task has sequences of different lengths, masked past their end: the 4 micro-batches of 8
    # hold different numbers of tokens, and only weighting every token alike equals the batch of 32.
    train_set, _ = stand_in.build_datasets(make_config())
    tokens_per_sample = (train_set.targets != stand_in.IGNORE).sum(dim=1)
    assert len(set(tokens_per_sample.tolist())) == stand_in.MAX_LEN
    common = ["precision=fp32", "max_steps=12", "log_every=1", "clip_grad_norm=0.5"]
    small = make_config(*common, "batch_size=8", "accum_steps=4", name="accum")
    big = make_config(*common, "batch_size=32", "accum_steps=1", name="big")
    train(small)
    train(big)
    for r_small, r_big in zip(train_records(small.out_dir), train_records(big.out_dir), strict=True):
        assert r_small["loss"] == pytest.approx(r_big["loss"], rel=1e-5)
        assert r_small["grad_norm"] == pytest.approx(r_big["grad_norm"], rel=1e-4)
    a, b = checkpoint(small.out_dir)["model"], checkpoint(big.out_dir)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_each_step_sees_only_its_own_gradients(make_config, monkeypatch):
    # A model whose mean loss has gradient exactly 1 for its one weight, on every micro-batch: the
    # optimizer must see 1 at every step (the gradient of the step's mean, not of its sum, nor of
    # the steps before it).
    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.weight.expand(len(x))

    seen = []
    monkeypatch.setattr(train_module, "build_model", lambda cfg: Constant())
    monkeypatch.setattr(train_module, "compute_loss", lambda output, target: (output.sum(), output.numel()))
    before_each_step(monkeypatch, lambda optimizer: seen.append(optimizer.param_groups[1]["params"][0].grad.item()))
    monkeypatch.setattr(validation_module, "evaluate", lambda *a, **k: {"val_loss": 1.0, "val_acc": 0.0})
    train(make_config("max_steps=5", "warmup_steps=0", "accum_steps=2", "clip_grad_norm=0", "eval_every=5"))
    assert seen == [1.0] * 5


# --- 4. clipping ---


def test_a_micro_batch_without_targets_adds_nothing(make_config, monkeypatch):
    # Every first micro-batch fully masked, and step 3 entirely: (0, 0) from the loss, never a NaN.
    calls = {"n": 0}

    def masked_loss(output, target):
        calls["n"] += 1
        if calls["n"] % 2 == 1 or calls["n"] in (5, 6):
            target = torch.full_like(target, stand_in.IGNORE)
        return stand_in.compute_loss(output, target)

    monkeypatch.setattr(train_module, "compute_loss", masked_loss)
    cfg = make_config("precision=fp32", "accum_steps=2", "max_steps=6", "warmup_steps=0", "log_every=1")
    train(cfg)
    records = train_records(cfg.out_dir)
    assert [r["skipped"] for r in records] == [0] * 6
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for i, r in enumerate(records) if i != 2)
    assert records[2]["loss"] == 0.0 and records[2]["grad_norm"] == 0.0  # no terms: nothing to learn from


@pytest.mark.parametrize("max_norm", [0.01, 0.0])
def test_the_optimizer_steps_with_clipped_gradients(make_config, monkeypatch, max_norm):
    norms_seen_by_step = []

    def record_norm(optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms_seen_by_step.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    before_each_step(monkeypatch, record_norm)
    cfg = make_config("precision=fp32", "max_steps=10", "log_every=1", f"clip_grad_norm={max_norm}")
    train(cfg)
    logged = [r["grad_norm"] for r in train_records(cfg.out_dir)]  # the norm before clipping
    assert min(logged) > 0.01
    # 0: no clipping, the optimizer sees the gradients whose norm was logged
    assert norms_seen_by_step == pytest.approx([max_norm] * 10 if max_norm else logged, rel=1e-5)
{%- if cookiecutter.loop == "plain" %}


def test_clipping_bounds_the_norm_and_reports_the_norm_before_it():
    model = torch.nn.Linear(4, 3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    expected = math.sqrt(100.0 * sum(p.numel() for p in model.parameters()))
    reported = clip_gradients(list(model.parameters()), max_norm=1.0)
    assert reported.item() == pytest.approx(expected, rel=1e-6)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert after.item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("max_norm", [0.0, 0.1, 1.0, 1e6])
def test_clipping_matches_torch_clip_grad_norm(max_norm):
    torch.manual_seed(0)
    ours, reference = torch.nn.Linear(8, 5), torch.nn.Linear(8, 5)
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        a.grad = torch.randn_like(a) * 3
        b.grad = a.grad.clone()
    norm = clip_gradients(list(ours.parameters()), max_norm)
    expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
    if max_norm > 0:
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    torch.testing.assert_close(norm, expected)
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_clipping_leaves_out_parameters_without_gradients(max_norm):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    assert clip_gradients(list(model.parameters()), max_norm).item() == 0.0  # no gradient at all yet: no error
    model[1].weight.grad = torch.full_like(model[1].weight, 2.0)  # one parameter has a gradient
    assert clip_gradients(list(model.parameters()), max_norm).item() == pytest.approx(math.sqrt(4.0 * 6))


def test_clipping_zero_leaves_gradients_alone():
    model = torch.nn.Linear(4, 3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    norm = clip_gradients(list(model.parameters()), max_norm=0)
    assert all(torch.equal(p.grad, torch.full_like(p, 10.0)) for p in model.parameters())
    assert norm.item() == pytest.approx(math.sqrt(100.0 * 15))  # still measured and logged


def test_fp16_grad_norm_is_measured_after_unscaling(make_config, no_dropout):
    # With the scaler's scale (65536 at first) left in, the fp16 norm would be that many times the fp32
    # one. At a tiny lr the weights hardly move, so the runs compare step by step, whichever steps fp16
    # skipped while its GradScaler searched for its scale.
    common = ["max_steps=16", "warmup_steps=0", "lr=1e-7", "min_lr=0", "log_every=1"]
    fp32 = make_config("precision=fp32", *common, name="fp32")
    fp16 = make_config("precision=fp16", *common, name="fp16")
    train(fp32)
    train(fp16)
    records = zip(train_records(fp16.out_dir), train_records(fp32.out_dir), strict=True)
    pairs = [(a, b) for a, b in records if not a["skipped"]]
    assert len(pairs) >= 4
    for a, b in pairs:
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.05)
{%- endif %}


# --- 5. schedule ---


@pytest.mark.parametrize("schedule", ["warmup_cosine", "onecycle", "step"])
def test_schedule_at_start_warmup_end_and_end(schedule):
    cfg = load_config(
        None,
        [
            f"lr_schedule={schedule}",
            "lr=1.0",
            "min_lr=0.01",
            "warmup_steps=10",
            "max_steps=100",
            "lr_step_size=30",
            "lr_gamma=0.5",
        ],
    )
    expected_start = {"warmup_cosine": 1 / 11, "onecycle": 1 / 25, "step": 1 / 11}[schedule]
    expected_end = {"warmup_cosine": 0.01, "onecycle": 0.01, "step": 0.5**2}[schedule]
    assert lr_at(0, cfg) == pytest.approx(expected_start)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(expected_end, abs=1e-3)  # the last of 100 steps
    values = [lr_at(s, cfg) for s in range(101)]
    assert max(values) == pytest.approx(1.0) and all(v >= 0 for v in values)


def test_wsd_warms_up_holds_the_peak_then_cools_down_linearly_to_min_lr():
    run = ["lr_schedule=wsd", "lr=1.0", "min_lr=0.1", "warmup_steps=10", "max_steps=100", "cooldown_steps=20"]
    cfg = load_config(None, run)
    assert lr_at(0, cfg) == pytest.approx(1 / 11)  # the same warmup as warmup_cosine's
    assert [lr_at(step, cfg) for step in (10, 50, 80)] == pytest.approx([1.0, 1.0, 1.0])  # stable up to step 80
    assert lr_at(90, cfg) == pytest.approx(0.55) and lr_at(100, cfg) == pytest.approx(0.1)  # linear to min_lr
    assert lr_at(99, cfg) == pytest.approx(0.1 + 0.9 / 20)
    for wrong in ("cooldown_steps=0", "cooldown_steps=91"):  # none, or more than the steps after warmup
        with pytest.raises(ConfigError, match="lr_schedule wsd needs cooldown_steps between 1 and 90"):
            load_config(None, [*run, wrong])
    with pytest.raises(ConfigError, match="cooldown_steps is wsd's; lr_schedule warmup_cosine takes 0"):
        load_config(None, ["lr_schedule=warmup_cosine", "cooldown_steps=5"])


def test_scheduler_follows_lr_at_once_per_step():
    cfg = load_config(None, ["lr=0.5", "warmup_steps=5", "max_steps=20"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg)
    for step in range(20):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(step, cfg))
        optimizer.step()
        scheduler.step()


def test_training_logs_the_scheduled_lr(make_config):
    cfg = make_config("precision=fp32", "max_steps=20", "log_every=1")  # fp16 may hold the schedule on a skip
    train(cfg)
    assert [r["lr"] for r in train_records(cfg.out_dir)] == pytest.approx([lr_at(s, cfg) for s in range(20)])


# --- optimizer ---


def test_optimizer_settings_and_lr_multipliers_reach_the_optimizer_with_decay_grouping_kept(make_config):
    cfg = make_config("max_steps=3", "warmup_steps=0", "lr_schedule=warmup_cosine", "beta1=0.8", "beta2=0.95",
                      "eps=1e-6", "lr_multipliers=0.=0.1")  # fmt: skip
    train(cfg)
    groups = checkpoint(cfg.out_dir)["optimizer"]["param_groups"]  # parameters by name
    assert [sorted(g["params"]) for g in groups] == [["1.weight", "4.weight"], ["1.bias", "4.bias"], ["0.weight"]]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.01]  # no decay on biases, whatever their lr
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in groups)
    lr = [g["lr"] for g in groups]  # after 3 steps of the schedule: the ratio holds
    assert lr[0] == lr[1] < cfg.lr and lr[2] == pytest.approx(0.1 * lr[0], rel=1e-12)
    # A prefix that names no parameter (a typo, another model's names) is refused before anything is written.
    typo = make_config("lr_multipliers=backbone.=0.1", name="typo")
    with pytest.raises(ConfigError, match="lr_multipliers: 'backbone.' starts no parameter's name; the model's start"):
        train(typo)
    assert not Path(typo.out_dir).exists()


# --- 6. validation + best checkpoint ---


def test_metrics_are_computed_once_from_the_whole_sets_totals(make_config):
    # Batches of 7 over 100 sequences, the last one short: a mean over batches would weigh them wrongly.
    cfg = make_config()
    _, val_set = stand_in.build_datasets(cfg)
    val_set = torch.utils.data.Subset(val_set, range(100))
    model = stand_in.build_model(cfg).eval()
    loader = torch.utils.data.DataLoader(val_set, batch_size=7)
    metrics = evaluate(model, loader, torch.device("cpu"), Precision("fp32", "cpu"), cfg.task)
    with torch.no_grad():
        output = torch.cat([model(inputs) for inputs, _ in loader])
    targets = torch.cat([targets for _, targets in loader])
    real = targets != stand_in.IGNORE
    right = output.argmax(dim=-1)[real] == targets[real]
    per_class = [right[targets[real] == c].double().mean() for c in targets[real].unique()]
    assert metrics["val_acc"] == pytest.approx(right.double().mean().item(), rel=1e-12)
    assert metrics["val_class_acc"] == pytest.approx(torch.stack(per_class).mean().item(), rel=1e-12)
    loss = torch.nn.functional.cross_entropy(output.flatten(0, 1), targets.flatten(), ignore_index=stand_in.IGNORE)
    assert metrics["val_loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_max_eval_batches_evaluates_the_same_first_batches_every_time(make_config, monkeypatch):
    seen = []

    def spy(output, target, task):
        seen.append(target.clone())
        return stand_in.metric_totals(output, target, task)

    monkeypatch.setattr(validation_module, "metric_totals", spy)
    cfg = make_config("max_steps=4", "warmup_steps=0", "eval_every=2", "max_eval_batches=3")
    train(cfg)
    assert len(seen) == 6  # 3 of the 16 batches at step 2, and 3 at step 4
    assert all(torch.equal(first, again) for first, again in zip(seen[:3], seen[3:], strict=True))
    _, val_set = stand_in.build_datasets(cfg)
    assert torch.equal(torch.cat(seen[:3]), val_set.targets[:96])  # the first ones


def test_a_capped_evaluation_takes_the_first_samples_of_every_ranks_shard():
    capped = [ShardSampler(100, rank, 2, limit=32) for rank in (0, 1)]
    assert [list(shard) for shard in capped] == [list(range(0, 64, 2)), list(range(1, 64, 2))]
    uneven = [ShardSampler(101, rank, 2) for rank in (0, 1)]
    assert [len(shard) for shard in uneven] == [51, 50]


def test_the_task_settings_reach_metric_totals_and_compute_metrics(make_config, monkeypatch):
    seen = []

    def spy(totals, task):
        seen.append((task.vocab, tuple(totals["tokens"].shape)))  # counted per token of task.vocab, in metric_totals
        return stand_in.compute_metrics(totals, task)

    monkeypatch.setattr(validation_module, "compute_metrics", spy)
    train(make_config("task.vocab=20", "max_steps=2", "warmup_steps=0", "eval_every=2"))
    assert seen == [(20, (20,))]


def test_metric_totals_that_change_shape_between_batches_are_one_line_before_anything_is_saved(
    make_config, monkeypatch
):
    # A per-class count without minlength: as long as the largest class the batch holds, so batches differ.
    def per_class_without_minlength(output, target, task):
        return {"tokens": torch.bincount(target[target != stand_in.IGNORE])}

    monkeypatch.setattr(validation_module, "metric_totals", per_class_without_minlength)
    cfg = make_config("max_steps=2", "warmup_steps=0", "eval_every=2", "batch_size=2")
    with pytest.raises(ConfigError, match=r"metric_totals \(task.py\) returned \{'tokens': \(\d+,\)\} for batch"):
        train(cfg)
    assert not (Path(cfg.out_dir) / "best.pt").exists()


def test_best_pt_is_never_written_in_a_streak_of_bad_steps_even_when_the_metric_improves(make_config, monkeypatch):
    # The first evaluation always improves on nothing; its step (10) is bad: no best.pt from those weights.
    nan_loss_on(monkeypatch, steps={10})
    cfg = make_config("max_steps=10", "warmup_steps=0", "eval_every=10", "ckpt_every=1000")
    train(cfg)
    assert [r["step"] for r in eval_records(cfg.out_dir)] == [10]
    assert not (Path(cfg.out_dir) / "best.pt").exists()


def test_two_validation_sets_are_each_evaluated_and_the_monitor_names_one(make_config, monkeypatch, capsys):
    monkeypatch.setattr(stand_in, "TWO_VAL_SETS", True)
    cfg = make_config("max_steps=30", "eval_every=10", "ckpt_every=10", "monitor=shifted/val_loss")
    train(cfg)
    records = [r for r in read_metrics(Path(cfg.out_dir) / "metrics.jsonl") if "shifted/val_loss" in r]
    metrics = ("val_loss", "val_acc", "val_class_acc")
    names = ["step", *(f"{name}/{metric}" for name in ("same", "shifted") for metric in metrics)]
    assert [sorted(r) for r in records] == [sorted(names)] * 3
    assert all(r["same/val_loss"] < r["shifted/val_loss"] for r in records)  # off the training distribution
    best = min(records, key=lambda r: r["shifted/val_loss"])
    last = checkpoint(cfg.out_dir)
    assert (last["best_metric"], last["best_step"]) == (best["shifted/val_loss"], best["step"])
    measured = evaluate_checkpoint(Path(cfg.out_dir) / "best.pt")  # evaluate reports every set
    assert measured.keys() == best.keys() - {"step"}
    assert all(measured[name] == pytest.approx(best[name], rel=1e-6) for name in measured)
    assert tag("val", "shifted/val_acc") == "val/shifted/acc" and tag("val", "val_acc") == "val/acc"  # TensorBoard's
    capsys.readouterr()
    refused = {"val_loss": "say whose, e.g. monitor=same/val_loss", "x/val_loss": "returned same, shifted"}
    for monitor, message in refused.items():
        assert main(cli(make_config(name=monitor.replace("/", "-")).out_dir, f"monitor={monitor}")) == 2
        assert message in capsys.readouterr().err


def test_best_checkpoint_is_replaced_only_on_improvement(make_config, monkeypatch):
    scripted = iter([0.5, 0.3, 0.4, 0.2, 0.6])
    monkeypatch.setattr(validation_module, "evaluate", lambda *a, **k: {"val_loss": next(scripted), "val_acc": 0.0})
    saved = record_saves(monkeypatch)
    cfg = make_config("max_steps=10", "eval_every=2", "ckpt_every=100")
    train(cfg)
    assert [step for name, step in saved if name == "best.pt"] == [2, 4, 8]
    best = checkpoint(cfg.out_dir, "best.pt")
    assert best["step"] == 8 and best["best_metric"] == 0.2


def test_monitor_val_acc_keeps_the_highest(make_config, monkeypatch):
    scripted = iter([0.5, 0.7, 0.6])
    monkeypatch.setattr(validation_module, "evaluate", lambda *a, **k: {"val_loss": 1.0, "val_acc": next(scripted)})
    cfg = make_config("max_steps=6", "warmup_steps=0", "eval_every=2", "monitor=val_acc")  # METRIC_GOALS: max
    train(cfg)
    assert checkpoint(cfg.out_dir, "best.pt")["step"] == 4


def test_early_stopping_after_patience_evaluations_without_a_new_best(make_config, monkeypatch):
    scripted = iter([0.5, 0.4, 0.45, 0.3, 0.35, 0.36, 0.37, 0.2])
    monkeypatch.setattr(validation_module, "evaluate", lambda *a, **k: {"val_loss": next(scripted), "val_acc": 0.0})
    cfg = make_config("max_steps=16", "warmup_steps=0", "eval_every=2", "ckpt_every=100", "patience=2")
    summary = train(cfg)
    assert summary["step"] == 12 and summary["exit_code"] == 0  # best at step 8, then 10 and 12 no better
    assert checkpoint(cfg.out_dir)["step"] == 12 and checkpoint(cfg.out_dir, "best.pt")["step"] == 8
    assert checkpoint(cfg.out_dir)["evals_since_best"] == 2  # a resumed run keeps counting


def test_init_from_starts_a_fresh_run_from_another_runs_weights(make_config, monkeypatch, capsys):
    # fp32 throughout: no skipped step (fp16 skips its first few while its scale settles), and one precision in
    # this process (Accelerate sets it once per process).
    source = make_config("precision=fp32", "max_steps=6", "warmup_steps=0", "eval_every=3", name="source")
    train(source)
    best = checkpoint(source.out_dir, "best.pt")
    models, seen = [], []
    real_build = train_module.build_optimizer

    def spy(model, *args):
        models.append(model)
        return real_build(model, *args)

    monkeypatch.setattr(train_module, "build_optimizer", spy)
    # The weights the new run starts from: those its first optimizer step sees.
    before_each_step(monkeypatch, lambda _: seen.append({k: v.clone() for k, v in models[0].state_dict().items()}))
    tuned = make_config("precision=fp32", "max_steps=4", "warmup_steps=0", f"init_from={source.out_dir}/best.pt",
                        name="tuned")  # fmt: skip
    assert train(tuned)["step"] == 4  # its own steps, schedule and optimizer, from 0
    assert_same_weights(seen[0], best["model"])
    assert first_moments(checkpoint(tuned.out_dir))["step"] == 4
    monkeypatch.setattr(stand_in, "WIDTH", 8)  # another model: one line, exit 1, nothing written
    assert main(cli(Path(tuned.out_dir).parent / "other", "precision=fp32", f"init_from={source.out_dir}/best.pt")) == 1
    assert "does not fit the model" in capsys.readouterr().err
    assert main(cli(Path(tuned.out_dir).parent / "other", "precision=fp32", "init_from=nowhere.pt")) == 2
    assert "init_from checkpoint nowhere.pt does not exist" in capsys.readouterr().err


def test_best_pt_loads_weights_only_and_reproduces_its_metric(make_config):
    cfg = make_config("max_steps=40", "eval_every=20")
    summary = train(cfg)
    best = checkpoint(cfg.out_dir, "best.pt")  # weights_only=True
    for key in ("model", "optimizer", "scheduler", "scaler", "config", "step", "best_metric"):
        assert key in best
    assert best["best_metric"] == summary["best_metric"]
    assert best["best_metric"] == min(r["val_loss"] for r in eval_records(cfg.out_dir))
    assert evaluate_checkpoint(f"{cfg.out_dir}/best.pt")["val_loss"] == best["best_metric"]


def test_evaluation_restores_train_mode_and_leaves_weights_alone(make_config, monkeypatch):
    seen = []
    real_evaluate = validation_module.evaluate

    def spy(model, *args):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        result = real_evaluate(model, *args)
        seen.append((model.training, all(torch.equal(before[k], v) for k, v in model.state_dict().items())))
        return result

    monkeypatch.setattr(validation_module, "evaluate", spy)
    train(make_config("max_steps=4", "warmup_steps=0", "eval_every=2"))
    assert seen == [(True, True), (True, True)]


# Activation checkpointing, on a stand-in with 6 residual MLP blocks (each holds 4 x 128-wide activations and a
# dropout mask for its backward): glibc's threshold set low, so that each process's peak is what torch held.
DEEP_MODEL = {"STAND_IN_DEPTH": "6", "STAND_IN_WIDTH": "128", "MALLOC_MMAP_THRESHOLD_": "131072"}
DEEP_RUN = ["batch_size=256", "max_steps=3", "warmup_steps=0", "log_every=1", "eval_every=3", "ckpt_every=3"]
DEEP_RUN += ["precision=fp32"]  # activations of 4 bytes, whatever precision the project was baked with
SAVED_MIB = 40  # at least what activation checkpointing saves here (about 80 MiB of activations)


def test_activation_checkpointing_trains_the_same_numbers_in_less_memory(tmp_path):
    peaks = {}
    for on in ("false", "true"):
        command = [sys.executable, str(ROOT / "tests" / "stand_in_cli.py"), "train", f"out_dir={tmp_path / on}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "STAND_IN_REPORT_PEAK": "1", **DEEP_MODEL}
        run = [*command, *DEEP_RUN, "max_eval_batches=1", f"activation_checkpointing={on}"]
        result = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        peaks[on] = int(result.stderr.strip().splitlines()[-1].split()[-1]) / 1024
    print(f"peak resident MiB: {peaks['false']:.0f} without activation checkpointing, {peaks['true']:.0f} with it")
    assert run_records(tmp_path / "true") == run_records(tmp_path / "false")  # dropout's draws repeated exactly
    assert_same_weights(checkpoint(tmp_path / "true")["model"], checkpoint(tmp_path / "false")["model"])
    assert peaks["true"] < peaks["false"] - SAVED_MIB
{%- if cookiecutter.loop == "plain" %}


@pytest.mark.parametrize("batch_size", [32, 512])  # about 200 and 3,300 loss terms (tokens) per micro-batch
def test_fp16_skips_no_step_at_the_start_of_a_run_on_a_summed_loss(make_config, batch_size):
    # GradScaler's real fp16 path runs on the CPU here (torch has CPU autocast and GradScaler for fp16).
    cfg = make_config("precision=fp16", f"batch_size={batch_size}", "max_steps=40", "log_every=1", "eval_every=100")
    train(cfg)
    skipped = [r["step"] for r in train_records(cfg.out_dir) if r.get("skipped")]
    assert skipped == [], f"steps skipped by fp16's GradScaler: {skipped}"
{%- endif %}


def test_keep_every_leaves_snapshots_that_evaluate_and_init_from_read(make_config):
    cfg = make_config("max_steps=30", "keep_every=10", "eval_every=10", "ckpt_every=10")
    train(cfg)
    snapshots = Path(cfg.out_dir) / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == [f"step-000000{n}0.pt" for n in (1, 2, 3)]
    for step, record in zip((10, 20, 30), eval_records(cfg.out_dir), strict=True):  # each, the weights of its step
        saved = checkpoint(snapshots, f"step-{step:08d}.pt")
        assert saved["step"] == step and "optimizer" not in saved  # the weights, and what evaluating them needs
        measured = evaluate_checkpoint(snapshots / f"step-{step:08d}.pt")
        assert measured["val_loss"] == pytest.approx(record["val_loss"], rel=1e-6)
    fine_tuned = make_config("max_steps=5", "warmup_steps=0", f"init_from={snapshots / 'step-00000020.pt'}", name="ft")
    assert train(fine_tuned)["step"] == 5


# --- weight EMA ---


def test_weight_ema_averages_on_the_device_from_ema_start_on():
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.75, start=1)
    weights = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for step, shift in enumerate((1.0, 2.0, 4.0)):
            for p in model.parameters():
                p.add_(shift)
            ema.update(step)
    # step 0 < ema_start: the average follows (w + 1); then 0.75 a + 0.25 w at w + 3, then at w + 7.
    expected = [w + 0.75 * (0.75 * 1.0 + 0.25 * 3.0) + 0.25 * 7.0 for w in weights]
    for average, want in zip(ema.average, expected, strict=True):
        torch.testing.assert_close(average, want)
    from_the_start = WeightEMA(model, decay=0.75, start=0)  # ema_start 0: from the weights it was made with
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    from_the_start.update(0)
    for average, p in zip(from_the_start.average, model.parameters(), strict=True):
        torch.testing.assert_close(average, p.detach() - 0.75)
    assert WeightEMA(model, decay=0.0, start=0).average == []  # off: nothing held, nothing done


def test_weight_ema_is_what_evaluation_and_best_pt_see_and_training_never_does(make_config):
    run = ["max_steps=30", "warmup_steps=0", "log_every=1", "eval_every=10", "ckpt_every=10"]
    plain = make_config(*run, "keep_every=1", name="plain")  # the weights after each step
    averaged = make_config(*run, "ema_decay=0.5", "ema_start=28", name="ema")
    train(plain)
    train(averaged)
    assert losses(plain.out_dir) == losses(averaged.out_dir)  # training: the weights themselves
    last = checkpoint(averaged.out_dir)
    assert_same_weights(checkpoint(plain.out_dir)["model"], last["model"])
    assert last["ema"].keys() == last["model"].keys()  # by name: every trainable parameter (all, here)
    # Up to step 28 the average follows the weights; then it moves half-way towards them after each step.
    w28, w29, w30 = (checkpoint(Path(plain.out_dir) / "snapshots", f"step-000000{n}.pt")["model"] for n in (28, 29, 30))
    for name, average in last["ema"].items():
        torch.testing.assert_close(average, 0.5 * (0.5 * w28[name] + 0.5 * w29[name]) + 0.5 * w30[name])
    # Evaluation measured the average: evaluate finds the same value from last.pt (its ema) and best.pt.
    final = eval_records(averaged.out_dir)[-1]
    assert final["val_loss"] != eval_records(plain.out_dir)[-1]["val_loss"]
    for name in ("last.pt", "best.pt"):
        measured = evaluate_checkpoint(Path(averaged.out_dir) / name)
        assert measured["val_loss"] == pytest.approx(final["val_loss"], rel=1e-6), name
    best = checkpoint(averaged.out_dir, "best.pt")
    assert best["step"] == 30 and "optimizer" not in best  # the average: weights to use, not a run to continue
    assert_same_weights({k: best["model"][k] for k in last["ema"]}, last["ema"])
    with pytest.raises(ConfigError, match=r"ema_decay must be in \[0, 1\)"):
        make_config("ema_decay=1.0")


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest_unless_model_py_says_otherwise(make_config, monkeypatch):
    vocab, width = 10, 8
    embedding, hidden, output = nn.Embedding(vocab, width), nn.Linear(width, width), nn.Linear(width, vocab)
    output.weight = embedding.weight  # tied, as a language model's often are
    model = nn.Sequential(embedding, hidden, nn.LayerNorm(width), output)
    assert hidden_matrices(model) == [hidden.weight]
    untied = nn.Sequential(nn.Embedding(vocab, width), nn.Linear(width, width), nn.Linear(width, 3))
    assert hidden_matrices(untied) == [untied[1].weight]  # not the output layer's
    optimizer = build_optimizer(model, make_config("optimizer=muon"), torch.device("cpu"))
    by_kind = {type(inner).__name__: {id(p) for g in inner.param_groups for p in g["params"]}
               for inner in (optimizer.muon, optimizer.adamw)}  # fmt: skip
    assert by_kind["Muon"] == {id(hidden.weight)}
    assert by_kind["AdamW"] == {id(p) for p in model.parameters()} - {id(hidden.weight)}
    # A model.py whose hidden_matrices names none: one line, before anything is trained.
    monkeypatch.setattr(train_module, "muon_matrices", lambda model: [])
    assert main(cli(make_config().out_dir, "optimizer=muon")) == 2
