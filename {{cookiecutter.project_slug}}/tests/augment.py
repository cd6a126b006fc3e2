"""Random augmentation drawn in ``__getitem__``, as data.py tells users to write it (torch, NumPy and Python)."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset


class Augmented(Dataset):
    """A training set whose items get noise drawn from every random stream, each time they are read."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        inputs, target = self.dataset[index]
        noise = 0.1 * torch.randn(inputs.shape) + float(np.random.uniform(-0.01, 0.01)) + random.uniform(-0.01, 0.01)
        return inputs + noise, target


def augmenting(build_datasets):
    """``build_datasets`` with its training set augmented."""

    def build(cfg):
        train_set, val_set = build_datasets(cfg)
        return Augmented(train_set), val_set

    return build
