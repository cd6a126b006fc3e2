"""The hot loop stays on the device: values are read back only at log, evaluation and save steps."""

from __future__ import annotations

import collections
import sys

import pytest
import torch

from {{ cookiecutter.package_name }} import train as train_module
from {{ cookiecutter.package_name }}.train import train

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
    train(make_config(f"precision={precision}", "max_steps=40", "warmup_steps=0", "log_every=10",
                      "eval_every=1000", "ckpt_every=1000"))  # fmt: skip
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
