"""The task the loop's guarantee tests train: the tests' own, not yours.

Every test file except test_your_task.py runs the loop on this task, put in
place through the same seams you edit (TaskConfig, check_task_config,
build_datasets, build_model, blocks, compute_loss, metric_totals,
compute_metrics, METRIC_GOALS), with the loop settings in ``LOOP`` instead of
your configs. So when you replace data.py, model.py, task.py and the configs,
these tests still prove the loop: they never build or check your TaskConfig.

The task is next-token prediction on sequences of different lengths, padded
to ``MAX_LEN``, with the padding's targets masked (``IGNORE``): every batch holds
a different number of loss terms, as in language-model training.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, IterableDataset

from {{ cookiecutter.package_name }} import evaluate as evaluate_module
from {{ cookiecutter.package_name }} import export as export_module
from {{ cookiecutter.package_name }} import plot as plot_module
from {{ cookiecutter.package_name }} import train as train_module
from {{ cookiecutter.package_name }}.essentials import config as config_module
from {{ cookiecutter.package_name }}.essentials import validation as validation_module
from {{ cookiecutter.package_name }}.machinery.loader import stream_part

VOCAB, MAX_LEN, IGNORE = 16, 12, -100
# Set by a test (monkeypatch) or, for the scripts tests start, by the environment; read when building.
TRAIN_SIZE = 1024  # 32 batches of 32 per epoch
VAL_SIZE = int(os.environ.get("STAND_IN_VAL_SIZE", "512"))
DROPOUT = float(os.environ.get("STAND_IN_DROPOUT", "0.1"))
WIDTH = int(os.environ.get("STAND_IN_WIDTH", "32"))
TRUNK_MB = int(os.environ.get("STAND_IN_TRUNK_MB", "0"))  # a frozen trunk of TRUNK_UNITS tables, this many MiB in all
TRUNK_UNITS = 16
DEPTH = int(os.environ.get("STAND_IN_DEPTH", "0"))  # residual MLP blocks between the embedding and the head
# The training set as a stream (an IterableDataset): "plain", without state_dict; "stateful", with it. "": map-style.
STREAM = os.environ.get("STAND_IN_STREAM", "")
VAL_STREAM = bool(os.environ.get("STAND_IN_VAL_STREAM"))  # the validation set as a stream too (SequenceParts)
TWO_VAL_SETS = bool(os.environ.get("STAND_IN_TWO_VAL_SETS"))  # two validation sets by name: same, shifted

# The loop settings of every guarantee test, before its own: none is left to config.py's defaults or
# to configs/*.yaml, which are yours to change.
LOOP = [
    *("device=cpu", "num_threads=1", "precision={{ cookiecutter.precision }}", "seed=0", "num_workers=0"),
    *("lr_schedule={{ cookiecutter.lr_schedule }}", "lr=1e-2", "min_lr=1e-4", "warmup_steps=10", "decay_steps=0"),
    *("lr_step_size=60", "lr_gamma=0.3", "weight_decay=0.01", "clip_grad_norm=1.0", "max_bad_steps=5"),
    *("batch_size=32", "accum_steps=1", "max_steps=120", "eval_every=40", "log_every=20", "ckpt_every=40"),
    "max_eval_batches=0",
    *("monitor=val_loss", "compile=false", "tensorboard=false", "progress=true", "tf32=true"),
    *("resume=", "overwrite=false", "dist_timeout_minutes=10", "max_time_minutes=0", "debug=false"),
    *("optimizer=adamw", "lr_multipliers=", "beta1=0.9", "beta2=0.999", "eps=1e-8", "momentum=0.9", "tracker=none"),
]
METRIC_GOALS = {"val_loss": "min", "val_acc": "max", "val_class_acc": "max"}


@dataclass
class TaskConfig:
    """The tests' task settings: the config's ``task:`` group in every guarantee test."""

    vocab: int = VOCAB  # the metrics count tokens of this vocabulary, one total per token


def check_task_config(task: TaskConfig) -> list[str]:
    return [] if task.vocab >= VOCAB else [f"task.vocab must be >= {VOCAB}, got {task.vocab}"]


class Sequences(Dataset):
    """(tokens, next tokens) pairs, padded to MAX_LEN; the targets past each sequence's length are IGNORE."""

    def __init__(self, size: int, generator: torch.Generator):
        lengths = torch.randint(1, MAX_LEN + 1, (size,), generator=generator)
        # A learnable rule (the next token is 3 x + 1 mod VOCAB) with one token in five random.
        tokens = torch.zeros(size, MAX_LEN + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(VOCAB, (size,), generator=generator)
        for t in range(MAX_LEN):
            noise = torch.randint(VOCAB, (size,), generator=generator)
            random = torch.rand(size, generator=generator) < 0.2
            tokens[:, t + 1] = torch.where(random, noise, (3 * tokens[:, t] + 1) % VOCAB)
        past_end = torch.arange(MAX_LEN + 1) >= lengths[:, None] + 1
        self.inputs = tokens[:, :-1].masked_fill(past_end[:, :-1], 0)
        self.targets = tokens[:, 1:].masked_fill(past_end[:, 1:], IGNORE)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


class SequenceStream(IterableDataset):
    """The training sequences as a stream, read as a sharded corpus is: each epoch in its own order, this process
    and worker's part of it (stream_part), and a token replaced at random in about half, drawn as it is read."""

    read: list[int] = []  # the indices read in this process, in order (without workers: every one)

    def __init__(self, sequences: Sequences, seed: int):
        self.sequences, self.seed, self.epoch = sequences, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def part(self) -> list[int]:
        part, parts = stream_part()
        order = torch.randperm(len(self.sequences), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return order[part::parts].tolist()

    def __iter__(self):
        for index in self.part():
            yield self.read_one(index)

    def read_one(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        SequenceStream.read.append(index)
        inputs, target = self.sequences[index]
        if random.random() < 0.5:  # augmentation, from every random stream
            inputs = inputs.clone()
            inputs[int(torch.randint(len(inputs), ()))] = int(np.random.randint(VOCAB))
        return inputs, target


class StatefulSequenceStream(SequenceStream):
    """The same stream, with the StatefulDataLoader protocol: how many samples of its part of the epoch it gave."""

    def __init__(self, sequences: Sequences, seed: int):
        super().__init__(sequences, seed)
        self.given, self.resume_at = 0, 0

    def __iter__(self):
        self.given, self.resume_at = self.resume_at, 0
        for index in self.part()[self.given :]:
            self.given += 1
            yield self.read_one(index)

    def state_dict(self) -> dict[str, int]:
        return {"given": self.given}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = state["given"]


class SequenceParts(IterableDataset):
    """The validation sequences as a finite stream: this process and worker's part (stream_part), in order."""

    def __init__(self, sequences: Sequences):
        self.sequences = sequences

    def __iter__(self):
        part, parts = stream_part()
        return (self.sequences[index] for index in range(part, len(self.sequences), parts))


class Shifted(Dataset):
    """A validation set off the training distribution: every input token one higher (the rule no longer holds)."""

    def __init__(self, sequences: Sequences):
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.sequences[index]
        return (inputs + 1) % VOCAB, targets


def build_datasets(cfg) -> tuple[Dataset, Dataset | dict[str, Dataset]]:
    generator = torch.Generator().manual_seed(cfg.seed)
    train_set, val_set = Sequences(TRAIN_SIZE, generator), Sequences(VAL_SIZE, generator)
    if STREAM:
        train_set = {"plain": SequenceStream, "stateful": StatefulSequenceStream}[STREAM](train_set, cfg.seed)
    if TWO_VAL_SETS:  # by name: an in-distribution set and a shifted one
        return train_set, {"same": val_set, "shifted": Shifted(val_set)}
    return train_set, SequenceParts(val_set) if VAL_STREAM else val_set


class FrozenTable(nn.Module):
    """A unit of a big model at almost no compute: a frozen table whose first row is added to the activations."""

    def __init__(self, megabytes: float):
        super().__init__()
        rows = max(1, int(megabytes * 2**20 / (4 * WIDTH)))
        self.table = nn.Parameter(torch.randn(rows, WIDTH) * 1e-3, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.table[0]


class Block(nn.Module):
    """A residual MLP block, whose activations (4 x WIDTH wide, dropout's mask) activation checkpointing drops."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.dropout = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH), nn.Dropout(DROPOUT)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.down(self.dropout(F.gelu(self.up(hidden))))


def build_model(cfg) -> nn.Module:
    trunk = [FrozenTable(TRUNK_MB / TRUNK_UNITS) for _ in range(TRUNK_UNITS)] if TRUNK_MB else []
    return nn.Sequential(
        nn.Embedding(VOCAB, WIDTH),
        *trunk,
        *(Block() for _ in range(DEPTH)),
        nn.Linear(WIDTH, WIDTH),
        nn.GELU(),
        nn.Dropout(DROPOUT),
        nn.Linear(WIDTH, VOCAB),
    )


def blocks(model: nn.Module) -> list[nn.Module]:
    return [layer for layer in model if any(True for _ in layer.parameters())]  # the embedding, trunk and linears


def compute_loss(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loss_sum = F.cross_entropy(output.float().flatten(0, -2), target.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss_sum, (target != IGNORE).sum()


def metric_totals(output: torch.Tensor, target: torch.Tensor, task: TaskConfig) -> dict[str, torch.Tensor]:
    """The loss's sum, and per target token (a vector: totals may have any shape) how many and how many right."""
    loss_sum, _ = compute_loss(output, target)
    real = target != IGNORE
    right = output.argmax(dim=-1)[real] == target[real]
    per_token = torch.bincount(target[real], minlength=task.vocab)
    right_per_token = torch.bincount(target[real], weights=right.double(), minlength=task.vocab)
    return {"loss": loss_sum, "tokens": per_token, "right": right_per_token}


def compute_metrics(totals: dict[str, torch.Tensor], task: TaskConfig) -> dict[str, torch.Tensor]:
    tokens, right = totals["tokens"], totals["right"]
    seen = tokens > 0
    return {
        "val_loss": totals["loss"] / tokens.sum(),
        "val_acc": right.sum() / tokens.sum(),
        "val_class_acc": (right[seen] / tokens[seen]).mean(),  # over the whole set, not a mean over batches
    }


def install(set_attribute=setattr) -> None:
    """Put this task in the loop's seams; ``set_attribute``: pytest's ``monkeypatch.setattr`` in tests."""
    set_attribute(config_module, "TaskConfig", TaskConfig)
    set_attribute(config_module, "check_task_config", check_task_config)
    for module in (train_module, evaluate_module):
        set_attribute(module, "build_datasets", build_datasets)
        set_attribute(module, "build_model", build_model)
    set_attribute(export_module, "build_model", build_model)
    set_attribute(train_module, "blocks", blocks)
    set_attribute(train_module, "compute_loss", compute_loss)
    set_attribute(validation_module, "METRIC_GOALS", METRIC_GOALS)
    set_attribute(plot_module, "METRIC_GOALS", METRIC_GOALS)
    set_attribute(validation_module, "metric_totals", metric_totals)
    set_attribute(validation_module, "compute_metrics", compute_metrics)
