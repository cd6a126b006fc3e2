"""YOURS TO REPLACE: the datasets.

``build_datasets(cfg)`` returns ``(train_dataset, val_dataset)``: map-style
datasets (``__len__`` and ``__getitem__``) whose items are ``(input, target)``,
or for training an ``IterableDataset`` that reads its part (``machinery.stream_part``;
docs/streaming.md). The loop never looks inside them. The stand-in below is a synthetic
classification task generated from the seed (no downloads): Gaussian clusters,
one per class, in ``task.input_dim`` dimensions.

If you add random augmentation, draw it inside ``__getitem__`` (from torch,
NumPy or Python's ``random``): a DataLoader worker seeds them before each
batch from (seed, rank, epoch, batch), so a resumed run draws exactly what an
uninterrupted one would (loader.py).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .essentials.config import Config


class TensorPairs(Dataset):
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


def _clusters(n: int, centers: torch.Tensor, generator: torch.Generator) -> TensorPairs:
    targets = torch.randint(len(centers), (n,), generator=generator)
    inputs = centers[targets] + torch.randn(n, centers.shape[1], generator=generator)
    return TensorPairs(inputs, targets)


def build_datasets(cfg: Config) -> tuple[Dataset, Dataset]:
    # A private generator: building the data never moves the global RNG streams.
    generator = torch.Generator().manual_seed(cfg.seed)
    task = cfg.task  # this task's settings (task.py)
    centers = 1.2 * torch.randn(task.num_classes, task.input_dim, generator=generator)
    return _clusters(task.train_size, centers, generator), _clusters(task.val_size, centers, generator)
