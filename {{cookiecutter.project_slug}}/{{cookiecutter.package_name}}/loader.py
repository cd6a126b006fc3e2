"""DataLoaders that are seeded and resumable.

Training order is a pure function of (seed, epoch): the sampler shuffles with
its own generator, so a run resumed mid-epoch continues with the very next
batch of the same order, without replaying or skipping data. Under torchrun
the same sampler gives each process its own shard.

Random augmentation drawn in a worker's ``__getitem__`` is a pure function of
(seed, rank, epoch, batch) too: the worker seeds its random streams before each
batch. Workers live across epochs (``persistent_workers``), so seeding them once
at start would make a resumed run draw differently from an uninterrupted one.
Without workers, ``__getitem__`` draws from the main process's streams, which
every checkpoint saves.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .config import Config, ConfigError
from .seed import seed_everything, seed_worker


def init_worker(worker_id: int) -> None:
    # Schedulers (SLURM, Kubernetes) and Ctrl-C signal every process of the job. Only the
    # main process acts on them (it saves last.pt, then shuts the workers down); a worker
    # dying of the signal first would crash the run before it could save.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed_worker(worker_id)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded, ``set_epoch``) that can start part-way into an epoch."""

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class SeededBatch(list):
    """A batch of dataset indices, with the seed its random augmentation draws from."""

    seed: int = 0


class SeededBatches(torch.utils.data.Sampler):
    """The sampler's indices in batches; batch k of an epoch gets seed f(seed, rank, epoch, k)."""

    def __init__(self, sampler: ResumableSampler, batch_size: int, seed: int, rank: int):
        self.sampler, self.batch_size, self.seed, self.rank = sampler, batch_size, seed, rank

    def __iter__(self) -> Iterator[SeededBatch]:
        indices, first = list(self.sampler), self.sampler.start // self.batch_size
        for k in range(len(indices) // self.batch_size):  # whole batches only (drop_last)
            batch = SeededBatch(indices[k * self.batch_size : (k + 1) * self.batch_size])
            batch.seed = self.seed
            for part in (self.rank, self.sampler.epoch, first + k):
                batch.seed = (batch.seed * 1_000_003 + part) % 2**63
            yield batch

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


class WorkerSeeded(Dataset):
    """The training set, as a DataLoader worker reads it: every random stream seeded per batch first."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, batch: SeededBatch) -> list[Any]:
        if torch.utils.data.get_worker_info() is not None:  # in a worker: its own streams, set per batch
            seed_everything(batch.seed)
        fetch_many = getattr(self.dataset, "__getitems__", None)  # a dataset's own batched read, if it has one
        return fetch_many(list(batch)) if fetch_many else [self.dataset[index] for index in batch]


class ShardSampler(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``: shards cover the set once, with no padding. ``limit``: at most
    that many of them, the first ones (the same every time); 0: all."""

    def __init__(self, size: int, rank: int, world_size: int, limit: int = 0):
        self.indices = range(rank, size, world_size)[: limit or None]
        # The shortest and the longest shard, the same on every rank: where the ranks' batches may differ.
        self.smallest = min(size // world_size, limit or size)
        self.largest = min(math.ceil(size / world_size), limit or size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class BatchStream:
    """An endless stream of training batches that knows its (epoch, batch) position."""

    def __init__(self, loader: DataLoader, sampler: ResumableSampler, batch_size: int, seed: int, rank: int = 0):
        self.loader, self.sampler, self.batch_size, self.seed, self.rank = loader, sampler, batch_size, seed, rank
        self.epoch, self.batch_in_epoch = 0, 0
        self._iterator: Iterator | None = None

    def _open_epoch(self) -> None:
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.batch_in_epoch * self.batch_size
        # Worker seeds come from this generator: re-seed it per (rank, epoch) so they do not depend on history.
        self.loader.generator.manual_seed((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.epoch)
        self._iterator = iter(self.loader)

    def __next__(self) -> Any:
        if self._iterator is None:
            self._open_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._open_epoch()
            batch = next(self._iterator)
        self.batch_in_epoch += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        # Samples consumed this epoch by all processes together: every rank has taken the
        # same number of batches, and together they cover a prefix of the epoch's order.
        return {"epoch": self.epoch, "samples_in_epoch": self.batch_in_epoch * self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the saved position; with another world size, at the nearest batch boundary at or past it."""
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = -(-int(state["samples_in_epoch"]) // self.global_batch)  # ceil: never replay a sample
        self._iterator = None

    @property
    def global_batch(self) -> int:
        """Samples per batch over all processes."""
        return self.batch_size * self.sampler.num_replicas


def build_loaders(
    cfg: Config, train_set: Dataset, val_set: Dataset, device: torch.device, rank: int = 0, world_size: int = 1
) -> tuple[BatchStream, DataLoader]:
    sampler = ResumableSampler(train_set, seed=cfg.seed, num_replicas=world_size, rank=rank)
    batches_per_epoch = len(sampler) // cfg.batch_size
    if batches_per_epoch < 1:
        raise ConfigError(
            f"the training set has {len(train_set)} samples ({len(sampler)} per process), "
            f"fewer than one batch of batch_size={cfg.batch_size}"
        )
    if len(val_set) < world_size:
        raise ConfigError(
            f"the validation set has {len(val_set)} sample(s), fewer than the {world_size} process(es) "
            "that each evaluate a part of it"
        )
    common = dict(
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        worker_init_fn=init_worker if cfg.num_workers > 0 else None,
    )
    train_loader = DataLoader(
        WorkerSeeded(train_set),
        # Whole batches only: every rank takes the same number of batches per epoch, and a position is a batch count.
        batch_sampler=SeededBatches(sampler, cfg.batch_size, cfg.seed, rank),
        generator=torch.Generator(),
        **common,
    )
    val_sampler = ShardSampler(len(val_set), rank, world_size, limit=cfg.max_eval_batches * cfg.batch_size)
    # Its own generator too: a DataLoader without one draws worker seeds from the global
    # RNG, so evaluating would shift the dropout stream of training.
    val_loader = DataLoader(
        val_set, batch_size=cfg.batch_size, sampler=val_sampler, generator=torch.Generator(), **common
    )
    return BatchStream(train_loader, sampler, cfg.batch_size, cfg.seed, rank), val_loader
