"""The optimizer: AdamW or SGD with momentum, its parameter groups, torch's fused kernels, and the step that
skips non-finite gradients on the device."""

from __future__ import annotations

import torch
from torch import nn

from .config import Config, ConfigError, lr_multipliers


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum (``cfg.optimizer``), one param group per lr factor and weight decay."""
    # Weight decay on weight matrices and embeddings only: decaying biases and norm gains towards zero only
    # hurts. lr_multipliers: parameters whose names start with a prefix get their own lr (the schedule keeps
    # the ratio); the first two groups hold the others, with and without decay.
    multipliers = lr_multipliers(cfg.lr_multipliers)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            factor = next((f for prefix, f in multipliers if name.startswith(prefix)), 1.0)
            groups.setdefault((factor, p.ndim >= 2), []).append(p)
    names = [name for name, _ in model.named_parameters()]
    for prefix, _ in multipliers:  # a typo would otherwise leave those parameters at the base lr, silently
        if not any(name.startswith(prefix) for name in names):
            raise ConfigError(
                f"lr_multipliers: '{prefix}' starts no parameter's name; the model's start with "
                f"{', '.join(sorted({name.split('.')[0] + '.' for name in names}))}"
            )
    param_groups = [
        {"params": params, "lr": cfg.lr * factor, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (factor, decay), params in groups.items()
    ]
    # The fused kernels are the fastest, and they can skip a step on the device (optimizer_step), so no
    # step needs a host sync. torch has them for CUDA, MPS and the CPU.
    fused = device.type in ("cuda", "mps", "cpu") or None
    if cfg.optimizer == "sgd":
        # FSDP's sharded parameters (DTensor) have no fused SGD: there SGD takes its foreach path, whose
        # skip of a non-finite step costs one host read per step.
        fused = None if cfg.parallel == "fsdp" else fused
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()``, unless ``skip`` (a float32 0/1 tensor) is 1: decided on the device where possible."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        # Fused optimizers take GradScaler's found_inf flag and skip on the device; the
        # gradients are already unscaled (grad_scale None). GradScaler.step(optimizer) does
        # the same for fp16 only: this works for every precision.
        optimizer.grad_scale, optimizer.found_inf = None, skip
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not skip.item():  # any other optimizer: one host read per step, as GradScaler.step makes for it
        optimizer.step()
