"""The optimizer: AdamW, SGD with momentum, or Muon with AdamW; its parameter groups, torch's fused kernels, and
the step that skips non-finite gradients on the device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError, lr_multipliers


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """Muon's parameters unless model.py says otherwise (its own ``hidden_matrices(model)``): every 2-D weight
    except the embeddings' (``nn.Embedding``) and the output layer's (the last ``nn.Linear`` the model holds)."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    embeddings = [module.weight for module in model.modules() if isinstance(module, nn.Embedding)]
    output = linears[-1].weight if linears else None
    return [
        p
        for p in model.parameters()
        if p.ndim == 2 and p is not output and not any(p is embedding for embedding in embeddings)
    ]


def build_optimizer(
    model: nn.Module, cfg: Config, device: torch.device, matrices: Callable = hidden_matrices
) -> torch.optim.Optimizer:
    """AdamW, SGD with momentum, or Muon with AdamW (``cfg.optimizer``), one param group per lr factor and weight
    decay (and for muon, per optimizer: ``matrices(model)`` are Muon's)."""
    # Weight decay on weight matrices and embeddings only: decaying biases and norm gains towards zero only
    # hurts. lr_multipliers: parameters whose names start with a prefix get their own lr (the schedule keeps
    # the ratio); the first two groups hold the others, with and without decay. muon: Muon's groups apart.
    multipliers = lr_multipliers(cfg.lr_multipliers)
    for_muon = {id(p) for p in matrices(model)} if cfg.optimizer == "muon" else set()
    groups: dict[tuple[float, bool, bool], list[nn.Parameter]] = {(1.0, True, False): [], (1.0, False, False): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            factor = next((f for prefix, f in multipliers if name.startswith(prefix)), 1.0)
            groups.setdefault((factor, p.ndim >= 2, id(p) in for_muon), []).append(p)
    names = [name for name, _ in model.named_parameters()]
    for prefix, _ in multipliers:  # a typo would otherwise leave those parameters at the base lr, silently
        if not any(name.startswith(prefix) for name in names):
            raise ConfigError(
                f"lr_multipliers: '{prefix}' starts no parameter's name; the model's start with "
                f"{', '.join(sorted({name.split('.')[0] + '.' for name in names}))}"
            )
    param_groups = [
        {"params": params, "lr": cfg.lr * factor, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (factor, decay, _), params in groups.items()
    ]
    # The fused kernels are the fastest, and they can skip a step on the device (optimizer_step), so no
    # step needs a host sync. torch has them for CUDA, MPS and the CPU.
    fused = device.type in ("cuda", "mps", "cpu") or None
    if cfg.optimizer == "sgd":
        # FSDP's sharded parameters (DTensor) have no fused SGD: there SGD takes its foreach path, whose
        # skip of a non-finite step costs one host read per step.
        fused = None if cfg.parallel == "fsdp" else fused
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    if cfg.optimizer == "muon":
        muon_groups = [group for group, (_, _, by_muon) in zip(param_groups, groups, strict=True) if by_muon]
        if not any(group["params"] for group in muon_groups):
            raise ConfigError(
                "optimizer=muon: the model has no hidden weight matrix for Muon (model.py's hidden_matrices "
                "says which); use adamw"
            )
        muon = torch.optim.Muon(
            muon_groups,
            lr=cfg.lr,
            momentum=cfg.muon_momentum,
            adjust_lr_fn="match_rms_adamw",  # its updates scaled to AdamW's size: the same lr and weight_decay work
        )
        adamw_groups = [group for group in param_groups if not any(group is other for other in muon_groups)]
        adamw = torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
        return MuonAndAdamW(muon, adamw)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


class MuonAndAdamW(torch.optim.Optimizer):
    """optimizer=muon: torch's Muon for the hidden weight matrices and torch's AdamW for the rest, as one optimizer,
    whose param groups (Muon's first) and state are theirs: the loop's step, schedule, clipping and checkpoints see
    one optimizer. Muon orthogonalizes each matrix's update (Newton-Schulz, in bf16); under FSDP on the whole
    matrix, which DTensor gathers for it. Its step has no flag to skip on the device: one host read per step."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        """Muon and AdamW work on this optimizer's groups and state (which load_state_dict replaces)."""
        count = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:count], self.param_groups[count:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        self.muon.step()
        self.adamw.step()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()


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
