"""Random augmentation drawn in ``__getitem__``, as data.py tells users to write it (torch, NumPy and Python)."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset


class Augmented(Dataset):
    """A training set whose items get a token replaced at random, drawn from every random stream, at each read."""

    def __init__(self, dataset: Dataset, vocab: int):
        self.dataset, self.vocab = dataset, vocab

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        inputs, target = self.dataset[index]
        position = int(torch.randint(len(inputs), ()))
        token = int(np.random.randint(self.vocab))
        if random.random() < 0.5:
            inputs = inputs.clone()
            inputs[position] = token
        return inputs, target


def augmenting(build_datasets, vocab: int = 16):
    """``build_datasets`` with its training set augmented (token inputs below ``vocab``: stand_in.VOCAB)."""

    def build(cfg):
        train_set, val_set = build_datasets(cfg)
        return Augmented(train_set, vocab), val_set

    return build
