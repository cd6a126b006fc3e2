"""What GPUs and other machines run, checked on the CPU wherever the CPU can express it."""

from __future__ import annotations

{% if cookiecutter.loop == "accelerate" -%}
import math
{% endif -%}
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from {{ cookiecutter.package_name }} import train as train_module
{%- if cookiecutter.loop == "plain" %}
from {{ cookiecutter.package_name }}.essentials.config import load_config
{%- endif %}
from {{ cookiecutter.package_name }}.essentials.precision import Precision, resolve_precision
from {{ cookiecutter.package_name }}.essentials.seed import rng_state, set_rng_state
from {{ cookiecutter.package_name }}.essentials.validation import evaluate
{%- if cookiecutter.loop == "plain" %}
from {{ cookiecutter.package_name }}.machinery import distributed
{%- endif %}
{%- if cookiecutter.loop == "plain" %}
from {{ cookiecutter.package_name }}.train import train

from . import stand_in
from .conftest import ROOT, checkpoint, first_moments, train_records
{%- else %}
from {{ cookiecutter.package_name }}.train import main, train

from . import stand_in
from .conftest import ROOT, assert_same_weights, checkpoint, cli, first_moments, train_records
{%- endif %}


class InBfloat16(nn.Module):
    """A model whose weights are bf16 (``model.to(torch.bfloat16)``), as people train big models without autocast."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(torch.bfloat16) if x.is_floating_point() else x)


def test_precision_bf16_computes_the_forward_in_bfloat16(make_config, monkeypatch):
    # What a layer inside the model computes in (Accelerate hands the loss fp32 outputs, by design).
    dtypes, real_build = [], train_module.build_model

    def recording_build(cfg):
        model = real_build(cfg)
        model[1].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))  # a Linear
        return model

    monkeypatch.setattr(train_module, "build_model", recording_build)
    train(make_config("precision=bf16", "max_steps=2", "warmup_steps=0", "eval_every=1000", "accum_steps=1"))
    assert dtypes[:2] == [torch.bfloat16, torch.bfloat16], dtypes  # the 2 training steps (then evaluation)


def test_a_model_cast_to_bf16_trains_and_skips_a_nan_step(make_config, monkeypatch):
    # Its loss and gradient norm are bf16; the fused optimizer's skip flag must still be float32.
    real_build = train_module.build_model
    monkeypatch.setattr(train_module, "build_model", lambda cfg: InBfloat16(real_build(cfg)))
    calls = {"n": 0}

    def bf16_loss(output, target):
        calls["n"] += 1
        loss = F.cross_entropy(output.flatten(0, -2), target.flatten(), reduction="sum")  # in bf16: no .float()
        return (loss * float("nan") if calls["n"] == 3 else loss), (target != -100).sum()

    monkeypatch.setattr(train_module, "compute_loss", bf16_loss)
    cfg = make_config("precision=fp32", "max_steps=6", "warmup_steps=0", "log_every=1", "eval_every=6")
    assert train(cfg)["skipped_steps"] == 1
    assert [r["skipped"] for r in train_records(cfg.out_dir)] == [0, 0, 1, 0, 0, 0]
    saved = checkpoint(cfg.out_dir)
    assert first_moments(saved)["step"] == 5
    assert all(value.dtype == torch.bfloat16 for value in saved["model"].values())


@pytest.mark.parametrize(("saved_with", "resumed_with"), [("other", "fused"), ("fused", "other")])
def test_resume_keeps_this_machines_optimizer_kernels(make_config, monkeypatch, saved_with, resumed_with):
    # "other": AdamW without its fused kernel, as on a device that lacks one. A checkpoint carries its
    # param groups' flags; loading them must not switch this machine's kernels.
    built = []
    real_build = train_module.build_optimizer

    def builder(kind: str):
        def build_optimizer(model, cfg, device, *rest):
            built.append(real_build(model, cfg, device if kind == "fused" else torch.device("meta"), *rest))
            return built[-1]

        return build_optimizer

    monkeypatch.setattr(train_module, "build_optimizer", builder(saved_with))
    train(make_config("precision=fp32", "max_steps=4", "warmup_steps=0"))  # fp32: no skipped step
    monkeypatch.setattr(train_module, "build_optimizer", builder(resumed_with))
    assert train(make_config("precision=fp32", "max_steps=8", "warmup_steps=0", "resume=auto"))["step"] == 8
    fused = True if resumed_with == "fused" else None
    assert [(group["fused"], group["foreach"]) for group in built[-1].param_groups] == [(fused, None)] * 2
    assert first_moments(checkpoint(make_config().out_dir))["step"] == 8


def test_a_tensor_cached_during_evaluation_can_be_trained_through():
    # Rotary tables and masks are often built on first use; evaluation must not make them inference tensors.
    class LazyScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.cache = nn.Linear(4, 3), None

        def forward(self, x):
            h = self.linear(x)
            if self.cache is None:
                self.cache = torch.ones(h.shape[-1])
            return h * self.cache

    model = LazyScale()
    data = [(torch.randn(8, 4), torch.randint(3, (8,)))]
    evaluate(model, data, torch.device("cpu"), Precision("fp32", "cpu"), stand_in.TaskConfig())
    F.cross_entropy(model(torch.randn(8, 4)), torch.randint(3, (8,))).backward()
    assert model.linear.weight.grad is not None


def test_precision_auto_picks_fp16_on_gpus_that_only_emulate_bf16(monkeypatch):
    # Pre-Ampere GPUs (V100, T4): torch counts bf16 as supported through emulation, slow and without tensor cores.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    gpu = torch.device("cuda", 0)
    assert resolve_precision("auto", gpu).name == "fp16"
    assert resolve_precision("bf16", gpu).name == "bf16"  # asked for by name: allowed, it works
{%- if cookiecutter.loop == "plain" %}


def test_one_process_on_gpu_n_makes_it_the_current_gpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    process = distributed.setup(load_config(None, ["device=cuda:1"]))
    assert process.device == torch.device("cuda", 1) and chosen == [process.device] and not process.has_peers
{%- else %}


def test_fp16_on_the_cpu_trains_in_fp32_and_says_so(make_config, caplog):
    cfg = make_config("precision=fp16", "max_steps=4", "warmup_steps=0", "log_every=1")
    with caplog.at_level("WARNING"):
        train(cfg)
    assert "Accelerate has no fp16 autocast on the CPU; training in fp32" in caplog.text
    assert [r["skipped"] for r in train_records(cfg.out_dir)] == [0] * 4  # no GradScaler searching its scale
    assert first_moments(checkpoint(cfg.out_dir))["step"] == 4


def with_a_grad_scaler(prepare):
    """``accelerator.prepare``, then Accelerate's fp16 GradScaler in place, as on a GPU: the loss scaled up in
    backward, unscaled before clipping, the step taken through the scaler. The forward stays in fp32 (the CPU
    has no fp16 autocast here), so scaling by a power of two changes no number when the order is right."""

    def prepare_with_scaler(*objects):
        accelerator = prepare.__self__
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        prepared = prepare(*objects)  # the optimizer is prepared with the scaler; the model without autocast
        accelerator.native_amp, accelerator.state._mixed_precision = True, "fp16"
        return prepared

    return prepare_with_scaler


def test_under_fp16s_grad_scaler_clipping_sees_the_unscaled_gradients(make_config, monkeypatch):
    run = ["precision=fp32", "max_steps=8", "warmup_steps=0", "log_every=1", "clip_grad_norm=0.5"]
    reference = make_config(*run, name="reference")
    train(reference)
    real_setup, scales = train_module.distributed.setup, []

    def setup_with_scaler(cfg):
        process = real_setup(cfg)
        monkeypatch.setattr(process.accelerator, "prepare", with_a_grad_scaler(process.accelerator.prepare))
        monkeypatch.setattr(process.accelerator, "clip_grad_norm_", spy_scale(process.accelerator, scales))
        return process

    monkeypatch.setattr(train_module.distributed, "setup", setup_with_scaler)
    scaled = make_config(*run, name="scaled")
    train(scaled)
    # Every step ran under the scaler, none skipped (it would halve the scale): its first scale fitted to the
    # summed loss (2^12 over the power of two nearest the first micro-batch's terms, precision.py), then kept.
    assert scales == [scales[0]] * 8 and math.log2(scales[0]).is_integer() and scales[0] < 2.0**12, scales
    # Clipping before unscaling would log norms 4096 times larger, and clip the gradients far more.
    assert [r["grad_norm"] for r in train_records(scaled.out_dir)] == [
        r["grad_norm"] for r in train_records(reference.out_dir)
    ]
    assert_same_weights(checkpoint(reference.out_dir)["model"], checkpoint(scaled.out_dir)["model"])


def spy_scale(accelerator, scales: list[float]):
    real_clip = accelerator.clip_grad_norm_

    def clip(*args, **kwargs):
        scales.append(accelerator.scaler.get_scale())
        return real_clip(*args, **kwargs)

    return clip


@pytest.mark.parametrize("plugin", ["FSDP", "DEEPSPEED"])
def test_accelerate_launch_with_fsdp_or_deepspeed_is_one_line_exit_2(tmp_path, capsys, monkeypatch, plugin):
    # What accelerate launch sets for such a config; on a CPU, Accelerate itself would run DDP in FSDP's place.
    monkeypatch.setenv(f"ACCELERATE_USE_{plugin}", "true")
    assert main(cli(tmp_path / "run")) == 2
    assert capsys.readouterr().err == (
        f"error: accelerate launch is configured for {plugin}; this loop runs one process or DDP: run `accelerate "
        "config` again without it, or launch with torchrun\n"
    )
    assert not (tmp_path / "run").exists()


def test_a_second_run_in_one_process_with_another_precision_is_one_line(tmp_path, capsys):
    # Accelerate sets its state once per process: the second run cannot change it.
    assert main(cli(tmp_path / "fp32", "precision=fp32", "max_steps=2", "warmup_steps=0")) == 0
    assert main(cli(tmp_path / "bf16", "precision=bf16", "max_steps=2", "warmup_steps=0")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Accelerate: AcceleratorState has already been initialized") and err.count("\n") == 1
    assert not (tmp_path / "bf16").exists()


@pytest.mark.parametrize(
    ("setting", "advice"), [("device=cuda:1", "CUDA_VISIBLE_DEVICES"), ("parallel=fsdp", "use parallel=ddp")]
)
def test_what_the_accelerate_loop_cannot_do_is_one_line_exit_2(tmp_path, capsys, setting, advice):
    assert main([*cli(tmp_path / "run"), setting]) == 2
    err = capsys.readouterr().err
    assert advice in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
{%- endif %}


@pytest.mark.parametrize("enabled", [False, True])
def test_tf32_switch_covers_matmuls_and_convolutions_through_torchs_current_api(enabled):
    # In a process of its own: once set through the current API, torch refuses to read the legacy flags.
    code = (
        "import torch; from {{ cookiecutter.package_name }}.essentials.precision import allow_tf32; "
        f"allow_tf32(torch.device('cuda', 0), {enabled}); "
        "print(torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    expected = "tf32" if enabled else "ieee"
    assert result.stdout.split() == [expected, expected], result.stderr


def test_the_gpu_random_stream_saved_is_the_current_gpus_and_resumes_on_fewer_gpus(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    state = rng_state()
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8))  # one GPU's, not every visible one's
    set_rng_state(state)
    # A checkpoint of an older version, saved seeing 4 GPUs, resumed by a process that sees 1: no IndexError.
    set_rng_state({**state, "cuda": [torch.tensor([index], dtype=torch.uint8) for index in range(4)]})
    assert [int(t[0]) for t in restored] == [7, 0]
