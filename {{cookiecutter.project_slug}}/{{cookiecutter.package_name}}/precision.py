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
    """Let fp32 matmuls use TF32 tensor cores on CUDA GPUs that have them (no effect elsewhere)."""
    if device.type == "cuda" and enabled:
        torch.set_float32_matmul_precision("high")


@dataclass(frozen=True)
class Precision:
    name: str  # bf16, fp16 or fp32: what is actually used
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def needs_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.needs_scaler else None


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
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
    if name == "bf16" and device.type != "cpu" and not _bf16_supported(device):
        raise ConfigError(f"precision bf16 is not supported on {device}; use precision=fp16 or auto")
    return Precision(name, device.type)
