"""Faults to inject into a run (a signal at the Nth call of a function, an error in the user's code), and what a
run's process measures of itself."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset


class SignalOnCall:
    """``function``, counting its calls, that sends ``signum`` to this process at call number ``call``."""

    def __init__(self, function: Callable[..., Any], call: int, signum: int = signal.SIGTERM):
        self.function, self.call, self.signum, self.calls = function, call, signum, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.call:
            os.kill(os.getpid(), self.signum)
        return self.function(*args, **kwargs)


class InjectedFailure(RuntimeError):
    """The error a user's code raises in these tests: nothing in the loop catches it."""


class FailOnCall:
    """``function``, counting its calls (in this process), that raises InjectedFailure at call number ``call``."""

    def __init__(self, function: Callable[..., Any], call: int, where: str):
        self.function, self.call, self.where, self.calls = function, call, where, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.call:
            raise InjectedFailure(f"injected failure in {self.where}")
        return self.function(*args, **kwargs)


def failing_training_set(build_datasets: Callable[..., Any], read: int) -> Callable[..., Any]:
    """``build_datasets`` whose training set raises InjectedFailure at its ``read``-th sample in each process that
    reads it (each DataLoader worker, with workers): a bad record, in a map-style set or a stream."""

    def build(cfg: Any) -> Any:
        train_set, val_set = build_datasets(cfg)
        if isinstance(train_set, IterableDataset):  # stand_in's streams read each sample through read_one
            train_set.read_one = FailOnCall(train_set.read_one, read, "a record of the stream")
            return train_set, val_set
        return FailingReads(train_set, read), val_set

    return build


class FailingReads(Dataset):
    """A map-style dataset whose ``read``-th sample read (in this process) raises InjectedFailure."""

    def __init__(self, dataset: Dataset, read: int):
        self.dataset, self.get = dataset, FailOnCall(dataset.__getitem__, read, "a sample of the training set")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.get(index)


def drawing_first(build_datasets: Callable[..., Any], draws: int) -> Callable[..., Any]:
    """``build_datasets`` that first draws ``draws`` numbers from torch's, NumPy's and Python's global streams, as
    a data.py that shuffles its shard list may (under torchrun, a number that depends on the rank)."""

    def build(cfg: Any) -> Any:
        torch.rand(draws), np.random.rand(draws), [random.random() for _ in range(draws)]
        return build_datasets(cfg)

    return build


def peak_resident_kib() -> int:
    """This process's peak resident memory so far (VmHWM), in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def slowed(function: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """``function``, taking ``seconds`` longer each call, as a slow disk makes ``os.fsync`` (the GIL released)."""

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return function(*args, **kwargs)

    return slow
