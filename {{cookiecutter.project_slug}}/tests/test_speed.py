"""The hot loop stays on the device: values are read back only at log, evaluation and save steps."""

from __future__ import annotations

import collections
import json
import logging
import resource
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from {{ cookiecutter.package_name }} import train as train_module
from {{ cookiecutter.package_name }}.essentials.config import ConfigError
from {{ cookiecutter.package_name }}.machinery import progress as progress_module
from {{ cookiecutter.package_name }}.machinery.speed import count_flops, peak_memory_mb
from {{ cookiecutter.package_name }}.train import train

from . import stand_in
from .conftest import assert_same_weights, checkpoint, run_records, train_records

# Every way a tensor's value reaches Python (each forces a host-device sync on a GPU).
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "__format__", "__repr__", "numpy")

{%- if cookiecutter.loop == "plain" %}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
{%- else %}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # fp16: a GPU's (Accelerate runs it as fp32 on the CPU)
{%- endif %}
def test_no_host_reads_between_log_steps(make_config, monkeypatch, precision):
    step = {"n": 0}
    reads: collections.Counter = collections.Counter()
    host_tensors: collections.Counter = collections.Counter()  # tensors built from Python values (a copy to a GPU)
    real_loss = train_module.compute_loss

    def counting_loss(output, target):
        step["n"] += 1  # accum_steps=1: one call per optimizer step
        return real_loss(output, target)

    def from_torch_data(frame) -> bool:
        return "torch/utils/data" in frame.f_code.co_filename.replace("\\", "/")  # the CPU data pipeline

    def counted(counter, original):
        def call(*args, **kwargs):
            if not from_torch_data(sys._getframe(1)):
                counter[step["n"]] += 1
            return original(*args, **kwargs)

        return call

    monkeypatch.setattr(train_module, "compute_loss", counting_loss)
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(reads, getattr(torch.Tensor, name)))
    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, counted(host_tensors, getattr(torch, name)))
    # With the weight EMA on: its update is one more device operation per step, no read.
    train(make_config(f"precision={precision}", "max_steps=40", "warmup_steps=0", "log_every=10",
                      "eval_every=1000", "ckpt_every=1000", "ema_decay=0.99"))  # fmt: skip
    monkeypatch.undo()
    assert {s for s in reads if s % 10} == set(), f"reads at steps {sorted(reads.items())}"
    assert [reads[s] for s in (10, 20, 30)] == [1, 1, 1]  # one read per log interval
    assert reads[40] <= 6  # the last step also evaluates and saves (fp16: the GradScaler's state too)
    assert {s for s in host_tensors if s % 10} == set(), f"tensors from host values at {sorted(host_tensors.items())}"


def test_compile_trains_and_checkpoints_keep_plain_weight_names(make_config, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def compile_eagerly(model, **kwargs):  # the "eager" backend: the same wrapping, no code generation
        compiled.append(model)
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    cfg = make_config("compile=true", "max_steps=6", "warmup_steps=0", "eval_every=3")
    train(cfg)
    assert len(compiled) == 1
    saved = torch.load(f"{cfg.out_dir}/last.pt", weights_only=True)["model"]
    assert not any("_orig_mod" in key or "module." in key for key in saved)
    summary = train(make_config("compile=false", "max_steps=8", "warmup_steps=0", "resume=auto"))
    assert summary["step"] == 8


def test_compile_is_skipped_with_a_reason_where_it_cannot_work(make_config, monkeypatch, caplog):
    monkeypatch.setattr(train_module.shutil, "which", lambda name: None)  # no C++ compiler
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compile should have been skipped"))
    with caplog.at_level("WARNING"):
        summary = train(make_config("compile=true", "max_steps=3", "warmup_steps=0"))
    assert summary["step"] == 3
    assert "compile=true skipped: compiling for the CPU needs a C++ compiler" in caplog.text


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch's own compiler imports
def test_compile_with_inductor(make_config):
    summary = train(make_config("compile=true", "max_steps=5", "warmup_steps=0", "eval_every=5"))
    assert summary["step"] == 5 and summary["metrics"]["val_acc"] > 0


def test_the_flops_of_a_known_model_are_its_hand_count():
    # The tests' model on 32 sequences of 12 tokens: an embedding (a lookup, no FLOPs), then linear layers of
    # 32 -> 32 and 32 -> 16 applied to each of the 384 tokens. A product of (n x k) by (k x m) is 2nkm FLOPs;
    # the backward makes two such products per layer (the input's and the weight's gradients): 3 per layer in all.
    tokens, width, vocab = 32 * stand_in.MAX_LEN, stand_in.WIDTH, stand_in.VOCAB
    by_hand = 3 * (2 * tokens * width * width + 2 * tokens * width * vocab)
    batch = stand_in.Sequences(32, torch.Generator().manual_seed(0))[:32]
    assert count_flops(stand_in.build_model, None, batch, stand_in.compute_loss) == by_hand == 3_538_944


def test_every_train_record_has_tokens_per_s_and_peak_memory_and_mfu_when_peak_flops_is_set(make_config, monkeypatch):
    # A fake clock, whatever the machine's load: 10 ms a micro-batch, and 10 s more in the first, left out.
    real_loss, terms = train_module.compute_loss, []

    def counted(output, target):
        loss_sum, count = real_loss(output, target)
        if not count.is_meta:  # FLOPs are counted on the meta device first: no values there
            terms.append(int(count))  # tokens, here: the targets that are not padding
        return loss_sum, count

    monkeypatch.setattr(train_module, "compute_loss", counted)
    clock = SimpleNamespace(perf_counter=lambda: 0.01 * len(terms) + (10.0 if terms else 0.0))
    monkeypatch.setattr(progress_module, "time", clock)
    monkeypatch.setattr(train_module, "time", clock)
    run = ["max_steps=20", "accum_steps=2", "warmup_steps=0", "log_every=5", "eval_every=100", "ckpt_every=100"]
    train(make_config(*run, "peak_flops=1e9"))
    flops_per_step = 2 * 3_538_944  # the hand count above, for each of the 2 micro-batches
    records = train_records(make_config().out_dir)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for record in records:
        steps = range(record["step"] - 5, record["step"])  # the record's steps, 50 a second (20 ms each)
        mean_terms = sum(terms[2 * s] + terms[2 * s + 1] for s in steps) / 5
        assert record["tokens_per_s"] == pytest.approx(mean_terms * 50, rel=1e-6)
        assert record["mfu"] == pytest.approx(flops_per_step * 50 / 1e9, rel=1e-6)
        assert 10 < record["peak_memory_mb"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"tokens_per_s {[round(r['tokens_per_s']) for r in records]}, mfu {records[0]['mfu']:.4f}")

    train(make_config(*run, name="no_peak"))  # no peak_flops: no mfu, no FLOPs counted
    assert all("mfu" not in r and "tokens_per_s" in r for r in train_records(make_config(name="no_peak").out_dir))


def test_peak_memory_is_in_mebibytes(monkeypatch):
    # getrusage's ru_maxrss is in KiB on Linux, bytes on macOS: 1,000 MiB either way, not 1,048.6 MB.
    kib_or_bytes = 1000 * 2**20 if sys.platform == "darwin" else 1000 * 2**10
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=kib_or_bytes))
    assert peak_memory_mb(torch.device("cpu")) == 1000.0


def test_profile_steps_traces_exactly_its_steps_and_changes_no_number(make_config, caplog):
    caplog.set_level(logging.INFO)
    run = ["max_steps=12", "warmup_steps=2", "log_every=2", "eval_every=6", "ckpt_every=6"]
    plain = make_config(*run, name="plain")
    train(plain)
    traced = {}
    for window in ("3-5", "11-12"):  # one inside the run, one that ends with it
        cfg = make_config(*run, f"profile_steps={window}", name=f"profiled-{window}")
        train(cfg)
        assert run_records(cfg.out_dir) == run_records(plain.out_dir)
        assert_same_weights(checkpoint(cfg.out_dir)["model"], checkpoint(plain.out_dir)["model"])
        events = json.loads((Path(cfg.out_dir) / "profile" / "trace-rank0.json").read_text())["traceEvents"]
        names = collections.Counter(event.get("name", "") for event in events)
        traced[window] = sorted(name for name in names if name.startswith("ProfilerStep#"))
        assert sum(count for name, count in names.items() if name.startswith("Optimizer.step#")) == len(traced[window])
        assert names["aten::addmm"] > 0 and names["aten::embedding"] > 0  # torch's operators, with their shapes
    assert traced == {"3-5": ["ProfilerStep#3", "ProfilerStep#4", "ProfilerStep#5"],
                      "11-12": ["ProfilerStep#11", "ProfilerStep#12"]}  # fmt: skip
    assert "profile of steps 11-12 written to" in caplog.text and "Self CPU time total" in caplog.text
    for window, message in (("5-3", "profile_steps must be A-B"), ("3-13", "ends after max_steps")):
        with pytest.raises(ConfigError, match=message):
            make_config(*run, f"profile_steps={window}")
