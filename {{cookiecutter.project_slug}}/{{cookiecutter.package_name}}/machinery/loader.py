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

An iterable training set (``IterableDataset``: a stream of samples) reads its
own part by rank and worker (``stream_part``), in whole batches per worker:
batch k of an epoch is drawn with the random streams seeded from (seed, rank,
worker, epoch, k), in workers and in the main process alike (where the training
streams are put back after it). A resumed run continues each worker where its
last trained batch left it: by the dataset's own ``state_dict()`` /
``load_state_dict()`` (the StatefulDataLoader protocol, which HF ``datasets``
follows) when it has them, else by reading the batches already trained on
again and skipping them (exact, slower).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info
from torch.utils.data.dataloader import default_collate

from ..essentials.config import Config, ConfigError
from ..essentials.seed import rng_state, seed_everything, seed_worker, set_rng_state
from .distributed import Process


def init_worker(worker_id: int) -> None:
    # Schedulers (SLURM, Kubernetes) and Ctrl-C signal every process of the job. Only the
    # main process acts on them (it saves last.pt, then ends the workers: workers_ended); a
    # worker dying of the signal first would crash the run before it could save.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed_worker(worker_id)


@contextlib.contextmanager
def workers_ended(*batches: BatchStream | StreamBatches | DataLoader) -> Iterator[None]:
    """End the DataLoader workers of ``batches`` on the way out, whichever way, an error's included.

    Left to themselves they would outlive an error: its traceback keeps their iterator (and so them)
    alive until the interpreter exits, when multiprocessing ends its children with SIGTERM, which
    they ignore (``init_worker``), and then waits for them forever."""
    try:
        yield
    finally:
        for loader in batches:
            loader = getattr(loader, "loader", loader)  # the DataLoader of a BatchStream or StreamBatches
            iterator = loader._iterator  # persistent_workers: the DataLoader keeps its iterator, and its workers
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()  # as the iterator's __del__ does: each worker is told to stop, joined


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded, ``set_epoch``) that can start part-way into an epoch."""

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def batch_seed(seed: int, *where: int) -> int:
    """The seed of one batch's random draws: a function of the run's seed and where the batch is (rank, epoch...)."""
    for part in where:
        seed = (seed * 1_000_003 + part) % 2**63
    return seed


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
            batch.seed = batch_seed(self.seed, self.rank, self.sampler.epoch, first + k)
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
        # The workers' own seeds (from the loader's generator) need no care: a worker seeds every random stream
        # before each batch it reads (WorkerSeeded), from where the batch is, so nothing it draws depends on them.
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

    def describe(self) -> str:
        per_epoch = len(self.sampler) // self.batch_size
        return f"{len(self.sampler.dataset):,} training samples, {per_epoch} batches per process an epoch"

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


class FirstSamples(IterableDataset):
    """The first ``limit`` samples of this process's part of an iterable validation set, shared by its workers."""

    def __init__(self, dataset: IterableDataset, limit: int):
        self.dataset, self.limit = dataset, limit

    def __iter__(self) -> Iterator[Any]:
        workers = get_worker_info().num_workers if get_worker_info() is not None else 1
        return itertools.islice(iter(self.dataset), math.ceil(self.limit / workers))


def stream_part() -> tuple[int, int]:
    """For an iterable training set's ``__iter__``: (which part, how many parts) to read, one part per worker of
    each process, e.g. ``itertools.islice(samples, part, None, parts)``; (0, 1) in one process without workers."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    worker = get_worker_info()
    worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
    return rank * workers + worker_id, world_size * workers


def has_stream_state(dataset: Any) -> bool:
    return callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))


@contextlib.contextmanager
def seeded_draws(seed: int) -> Iterator[None]:
    """The CPU's random streams (torch, Python, NumPy) seeded with ``seed`` inside, and put back after: the
    training's own draws (dropout) never see the data's. CUDA's stream is left alone: data is made on the CPU."""
    saved = rng_state(cuda=False)
    seed_everything(seed, cuda=False)
    try:
        yield
    finally:
        set_rng_state(saved)


class SeededStream(IterableDataset):
    """An iterable training set as one worker (or the main process) reads it: endless, in whole batches of
    ``batch_size`` samples, epoch after epoch (a short batch at an epoch's end is dropped). Yields each batch
    with the worker's position after it, or ``(None, message)`` when an epoch holds no whole batch."""

    def __init__(self, dataset: IterableDataset, batch_size: int, seed: int, rank: int):
        self.dataset, self.batch_size, self.seed, self.rank = dataset, batch_size, seed, rank
        self.start: list[dict[str, Any]] = []  # each worker's position to continue from (a resumed run)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        worker = get_worker_info().id if get_worker_info() is not None else 0
        position = self.start[worker] if self.start else {"worker": worker, "epoch": 0, "batch": 0, "dataset": None}
        epoch, first = position["epoch"], position["batch"]
        while True:
            if callable(getattr(self.dataset, "set_epoch", None)):  # e.g. HF datasets: reshuffle per epoch
                self.dataset.set_epoch(epoch)
            restored = position["dataset"] is not None
            if restored:  # the dataset's own record of where it was: no need to read the batches before
                self.dataset.load_state_dict(position["dataset"])
            samples = iter(self.dataset)
            for batch in itertools.count(first if restored else 0):
                with seeded_draws(batch_seed(self.seed, self.rank, worker, epoch, batch)):
                    items = list(itertools.islice(samples, self.batch_size))
                if len(items) < self.batch_size:
                    break
                if batch < first:  # fast-forward: read again exactly as before (same seeds), and skip
                    continue
                state = self.dataset.state_dict() if has_stream_state(self.dataset) else None
                position = {"worker": worker, "epoch": epoch, "batch": batch + 1, "dataset": state}
                yield default_collate(items), position
            if batch == 0:
                where = f"worker {worker} of process {self.rank}"
                yield None, f"the training set gave {where} fewer than batch_size={self.batch_size} samples in an epoch"
                return
            epoch, first, position = epoch + 1, 0, {"dataset": None}


class StreamBatches:
    """The endless stream of training batches of an iterable training set, with every worker's position in it:
    this process's (``process``), and in ``state_dict`` every process's, gathered on rank 0."""

    def __init__(self, loader: DataLoader, process: Process):
        self.loader, self.process, self.rank, self.world_size = loader, process, process.rank, process.world_size
        self.stream: SeededStream = loader.dataset
        self.workers = max(1, loader.num_workers)
        self.positions: list[dict[str, Any]] = []  # the position after the last batch trained on, per worker
        self._iterator: Iterator | None = None

    def __next__(self) -> Any:
        if self._iterator is None:
            self.stream.start = self.positions  # workers start (or continue) from here
            self._iterator = iter(self.loader)
        batch, position = next(self._iterator)
        if batch is None:
            raise ConfigError(position)
        if not self.positions:
            self.positions = [{"worker": w, "epoch": 0, "batch": 0, "dataset": None} for w in range(self.workers)]
        self.positions[position["worker"]] = position
        return batch

    def describe(self) -> str:
        dataset = self.stream.dataset
        how = "its own state_dict()"
        if not has_stream_state(dataset):
            how = "reading again the batches already trained on (no state_dict(): exact, slower)"
        parts = f"{type(dataset).__name__}, {self.workers} part(s) per process"
        return f"an iterable training set ({parts}); a resumed run continues it by {how}"

    def state_dict(self) -> dict[str, Any]:
        """Every process's worker positions (on rank 0; every rank calls it)."""
        return {"stream": self.process.gather_on_main(self.positions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "stream" not in state:
            raise ConfigError(
                "resume: the checkpoint was saved with a map-style training set, and build_datasets "
                "now returns an iterable one; start afresh (init_from= keeps the weights)"
            )
        processes = state["stream"]
        if len(processes) != self.world_size or len(processes[self.rank]) != self.workers:
            raise ConfigError(
                f"resume: an iterable training set continues exactly only as it was read, by {len(processes)} "
                f"process(es) x {len(processes[0])} worker(s) each; now {self.world_size} x {self.workers}: "
                "resume with those (torchrun's --nproc-per-node, num_workers), or start afresh with init_from="
            )
        self.positions = processes[self.rank]
        self._iterator = None


def build_loaders(
    cfg: Config, train_set: Dataset, val_sets: Dataset | dict[str, Dataset], process: Process
) -> tuple[BatchStream | StreamBatches, dict[str, DataLoader]]:
    """The training batches (endless, resumable) and the validation loaders of this process (``process``): one
    per validation set, by its name ("" for the one set build_datasets returned alone)."""
    common = dict(
        num_workers=cfg.num_workers,
        pin_memory=process.device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        worker_init_fn=init_worker if cfg.num_workers > 0 else None,
    )
    val_sets = val_sets if isinstance(val_sets, dict) else {"": val_sets}
    if not val_sets or not all(isinstance(name, str) and "/" not in name for name in val_sets):
        raise ConfigError(
            f"build_datasets returned validation sets named {list(val_sets)}: name each with a string, without '/'"
        )
    limit = cfg.max_eval_batches * cfg.batch_size  # samples per process; 0: all
    val_loaders = {}
    for name, val_set in val_sets.items():
        if isinstance(val_set, IterableDataset):  # it reads its own part (stream_part), in the same order each time
            val_set = FirstSamples(val_set, limit) if limit else val_set
            val_sampler = None
        elif len(val_set) < process.world_size:
            raise ConfigError(
                f"the validation set{f' {name}' if name else ''} has {len(val_set)} sample(s), fewer than the "
                f"{process.world_size} process(es) that each evaluate a part of it"
            )
        else:
            val_sampler = ShardSampler(len(val_set), process.rank, process.world_size, limit)
        # Its own generator too: a DataLoader without one draws worker seeds from the global
        # RNG, so evaluating would shift the dropout stream of training.
        val_loaders[name] = DataLoader(
            val_set, batch_size=cfg.batch_size, sampler=val_sampler, generator=torch.Generator(), **common
        )
    if isinstance(train_set, IterableDataset):  # batched by SeededStream itself (batch_size=None)
        stream = SeededStream(train_set, cfg.batch_size, cfg.seed, process.rank)
        loader = DataLoader(stream, batch_size=None, generator=torch.Generator(), **common)
        return StreamBatches(loader, process), val_loaders
    sampler = ResumableSampler(train_set, seed=cfg.seed, num_replicas=process.world_size, rank=process.rank)
    if len(sampler) // cfg.batch_size < 1:
        raise ConfigError(
            f"the training set has {len(train_set)} samples ({len(sampler)} per process), "
            f"fewer than one batch of batch_size={cfg.batch_size}"
        )
    train_loader = DataLoader(
        WorkerSeeded(train_set),
        # Whole batches only: every rank takes the same number of batches per epoch, and a position is a batch count.
        batch_sampler=SeededBatches(sampler, cfg.batch_size, cfg.seed, process.rank),
        generator=torch.Generator(),
        **common,
    )
    return BatchStream(train_loader, sampler, cfg.batch_size, cfg.seed, process.rank), val_loaders
