"""The benchmark's two tasks.

- mlp: the generated project's own synthetic task and MLP, sized 20-64-64-10 with batch 64 and no
  dropout: its step time is mostly loop overhead.
- transformer: a small causal transformer language model on synthetic token sequences, put in place
  of the project's data.py/model.py/task.py the way a user would: compute-dominated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset


class Pairs(Dataset):
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.inputs[i], self.targets[i]


# --- transformer language model ---

VOCAB, CONTEXT, WIDTH, LAYERS, HEADS = 256, 64, 128, 2, 4


def lm_data(cfg):
    # A random first-order Markov "language": learnable, generated from the seed.
    g = torch.Generator().manual_seed(cfg.seed)
    transitions = torch.softmax(3 * torch.randn(VOCAB, VOCAB, generator=g), dim=-1)

    def make(n):
        tokens = torch.empty(n, CONTEXT + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(VOCAB, (n,), generator=g)
        for t in range(CONTEXT):
            tokens[:, t + 1] = torch.multinomial(transitions[tokens[:, t]], 1, generator=g).squeeze(1)
        return Pairs(tokens[:, :-1], tokens[:, 1:])

    return make(cfg.task.train_size), make(cfg.task.val_size)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.zeros(CONTEXT, WIDTH))
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        x = self.blocks(x, mask=self.causal, is_causal=True)
        return self.head(self.norm(x))


def lm_loss(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    return F.cross_entropy(output.float().flatten(0, 1), target.flatten(), reduction="sum"), target.numel()


def lm_totals(output: torch.Tensor, target: torch.Tensor, task) -> dict[str, torch.Tensor | int]:
    loss_sum, tokens = lm_loss(output, target)
    # A token is right when its target's logit is the largest: argmax up to exact ties, and on
    # the CPU about 15x faster than argmax over a 256-token vocabulary.
    right = output.gather(-1, target.unsqueeze(-1)).squeeze(-1) >= output.amax(dim=-1)
    return {"loss": loss_sum, "right": right.sum(), "tokens": tokens}


def lm_metrics(totals: dict[str, torch.Tensor], task) -> dict[str, torch.Tensor]:
    return {"val_loss": totals["loss"] / totals["tokens"], "val_acc": totals["right"] / totals["tokens"]}


def lm_flops_per_sample(cfg) -> float:
    # 6 FLOPs per parameter per token (forward + backward), plus attention's 12 * layers * context * width.
    params = VOCAB * WIDTH * 2 + LAYERS * 12 * WIDTH * WIDTH
    return CONTEXT * (6 * params + 12 * LAYERS * CONTEXT * WIDTH)


@dataclass(frozen=True)
class Task:
    name: str
    overrides: tuple[str, ...]
    steps: int
    # None: the generated project's own function.
    build_datasets: Callable | None = None
    build_model: Callable | None = None
    compute_loss: Callable | None = None
    metric_totals: Callable | None = None
    compute_metrics: Callable | None = None
    flops_per_sample: Callable | None = None
    # The median of many short interleaved runs shrugs off this shared machine's slow swings
    # (single rounds differ by up to 10%) better than a few long runs.
    rounds_multiplier: int = 1


TASKS = {
    "mlp": Task(
        "mlp",
        (
            "task.input_dim=20",
            "task.hidden_dim=64",
            "task.num_classes=10",
            "task.dropout=0",
            "batch_size=64",
            "task.train_size=8192",
            "task.val_size=2048",
        ),
        600,
        rounds_multiplier=2,
    ),  # fmt: skip
    "transformer": Task(
        "transformer",
        ("batch_size=16", "task.train_size=1024", "task.val_size=256"),
        12,
        lm_data,
        lambda cfg: TinyLM(),
        lm_loss,
        lm_totals,
        lm_metrics,
        lm_flops_per_sample,
        rounds_multiplier=3,
    ),  # fmt: skip
}
