"""The hot loop stays on the device: values are read back only at log, evaluation and save steps."""

from __future__ import annotations

import collections
import sys

import pytest
import torch

from {{ cookiecutter.package_name }} import train as train_module
from {{ cookiecutter.package_name }}.train import train

from .conftest import checkpoint, force_device_path, nan_loss_on, train_records

# Every way a tensor's value reaches Python (each forces a host-device sync on a GPU).
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "__format__", "__repr__", "numpy")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_host_reads_between_log_steps(make_config, monkeypatch, precision):
    step = {"n": 0}
    reads: collections.Counter = collections.Counter()
    real_loss = train_module.compute_loss

    def counting_loss(output, target):
        step["n"] += 1  # accum_steps=1: one call per optimizer step
        return real_loss(output, target)

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "torch/utils/data" not in caller.replace("\\", "/"):  # the CPU data pipeline (sampler, seeds)
                reads[step["n"]] += 1
            return original(self, *args, **kwargs)

        return read

    monkeypatch.setattr(train_module, "compute_loss", counting_loss)
    force_device_path(monkeypatch)  # the CPU reads per step by design (reads_are_free): check the GPU path
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    train(make_config(f"precision={precision}", "max_steps=40", "warmup_steps=0", "log_every=10",
                      "eval_every=1000", "ckpt_every=1000"))  # fmt: skip
    monkeypatch.undo()
    assert {s for s in reads if s % 10} == set(), f"reads at steps {sorted(reads.items())}"
    assert [reads[s] for s in (10, 20, 30)] == [1, 1, 1]  # one read per log interval
    assert reads[40] <= 4  # the last step also evaluates and saves


def test_the_cpu_reads_values_each_step_and_trains_like_the_device_path(make_config, monkeypatch):
    real_item = torch.Tensor.item
    item_calls = collections.Counter()

    def counted_item(self):
        item_calls[path] += 1
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    runs = {}
    for path in ("host", "device"):
        with monkeypatch.context() as patch:
            if path == "device":
                force_device_path(patch)
            nan_loss_on(patch, steps={5})
            runs[path] = make_config(
                "precision=fp32", "max_steps=16", "log_every=1", "clip_grad_norm=0.05", "eval_every=16", name=path
            )
            train(runs[path])
    assert item_calls["host"] >= 2 * 16 > item_calls["device"]  # the loss and the grad norm, every step
    host, device = (train_records(runs[path].out_dir) for path in ("host", "device"))
    assert [r["skipped"] for r in host] == [r["skipped"] for r in device] == [0] * 4 + [1] + [0] * 11
    assert sum(r.get("grad_norm", 0) > 0.05 for r in host) >= 12  # clipping was at work
    for a, b in zip(host, device, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    a, b = checkpoint(runs["host"].out_dir)["model"], checkpoint(runs["device"].out_dir)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


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
