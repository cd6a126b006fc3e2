"""Essential 3: mixed precision (and the device it runs on).

bf16 autocasts with no GradScaler (bfloat16 has fp32's range); fp16 autocasts
and needs a GradScaler so small gradients do not underflow; fp32 runs without
autocast. ``auto`` picks bf16 where the device supports it, fp16 on a CUDA GPU
without bf16, and fp32 on CPU (bf16 is slower than fp32 on most CPUs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .config import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """Turn the config's ``device`` into a torch.device that exists on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' is not available: torch sees no CUDA GPU here (use device=cpu or auto)")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device '{name}' is not available on this machine (use device=cpu or auto)")
    return device


def allow_tf32(device: torch.device, enabled: bool) -> None:
    """On CUDA, let fp32 matmuls and cuDNN convolutions use TF32 tensor cores (Ampere and newer), or forbid both."""
    if device.type != "cuda":
        return
    if hasattr(torch.backends.cudnn, "conv"):  # torch 2.9+: the settings torch.compile's kernels read too
        torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"  # tf32 by default: off too
    else:  # older torch: its legacy flags (torch refuses a mix of the two)
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


@dataclass(frozen=True)
class Precision:
    name: str  # bf16, fp16 or fp32: what is actually used
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]
{%- if cookiecutter.loop == "plain" %}

    @property
    def needs_scaler(self) -> bool:
        return self.name == "fp16"
{%- endif %}

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

{%- if cookiecutter.loop == "plain" %}

    def make_scaler(self, sharded: bool = False) -> torch.amp.GradScaler:
        """A GradScaler for fp16; for bf16 and fp32 a disabled one (its methods do nothing): one path in the loop.

        ``sharded`` (FSDP): each rank unscales only its shard of the gradients, so an overflow must be agreed
        on by every rank (one all-reduce of the flag) for their scales to stay the same.
        """
        if sharded and self.needs_scaler:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.device_type)
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)
{%- endif %}


def fit_first_scale(scaler: torch.amp.GradScaler, terms: torch.Tensor) -> None:
    """fp16 with a summed loss: its gradients are ``terms`` times a mean loss's, and GradScaler's first scale
    (2^16) is chosen for a mean, so a run's first steps would overflow and be skipped. Called once, at a fresh
    run's first micro-batch, with its count of terms (the mean over processes: the same on every rank): the first
    scale is divided by the power of two nearest it, so unscaling stays exact. No host sync. For an enabled
    GradScaler only."""
    first = scaler.scale(torch.ones((), device=terms.device))  # its scale, made at this first use
    scaler.update(first / torch.exp2(torch.round(torch.log2(terms.clamp(min=1)))))


def _bf16_supported(device: torch.device, emulated_too: bool = False) -> bool:
    if device.type == "cuda":
        # Counting emulation, torch says yes on pre-Ampere GPUs too, where bf16 has no tensor cores and crawls.
        return torch.cuda.is_bf16_supported(including_emulation=emulated_too)
    return (
        device.type == "mps"
        and hasattr(torch.backends.mps, "is_macos_or_newer")
        and torch.backends.mps.is_macos_or_newer(14, 0)
    )


def resolve_precision(requested: str, device: torch.device) -> Precision:
    if requested == "auto":
        if device.type == "cpu":
            name = "fp32"
        elif _bf16_supported(device):
            name = "bf16"
        else:
            name = "fp16"
    else:
        name = requested
    if name == "bf16" and device.type != "cpu" and not _bf16_supported(device, emulated_too=True):
        raise ConfigError(f"precision bf16 is not supported on {device}; use precision=fp16 or auto")
{%- if cookiecutter.loop == "accelerate" %}
    if name == "fp16" and device.type == "cpu":  # Accelerate has no fp16 autocast on the CPU (distributed.setup warns)
        name = "fp32"
{%- endif %}
    return Precision(name, device.type)
