"""Essential 2: one seed, set first, applied to everything.

``seed_everything`` seeds Python, NumPy (when installed) and torch (CPU and
every CUDA device). The DataLoader gets its own seeded generator (see
``loader.py``) so shuffling never draws from, or disturbs, the global streams.
``rng_state``/``set_rng_state`` capture and restore every stream so a resumed
run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import random
from typing import Any

import torch

try:
    import numpy as np
except ImportError:  # NumPy is optional
    np = None


def seed_everything(seed: int, cuda: bool = True) -> None:
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)
    if cuda:
        torch.manual_seed(seed)  # also seeds every CUDA device
    else:
        torch.default_generator.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive Python/NumPy seeds from torch's per-worker seed."""
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    if np is not None:
        np.random.seed(worker_seed)


def rng_state(cuda: bool = True) -> dict[str, Any]:
    """Every RNG stream this process uses, as tensors, numbers and lists only (loads with weights_only=True).

    Of the GPUs, only the current one's: each process trains on one device (distributed.setup makes it
    the current one), and a resumed process may see fewer GPUs than the one that saved. ``cuda=False``: the
    CPU's streams only.
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if cuda and torch.cuda.is_initialized() else None,
        "mps": torch.mps.get_rng_state() if cuda and torch.backends.mps.is_available() else None,
        "numpy": None,
    }
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # saved by an older version: one state per visible GPU; ours is the current one
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    if state.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
    if np is not None and state["numpy"] is not None:
        st = state["numpy"]
        keys = st["keys"].numpy().astype(np.uint32)
        np.random.set_state((st["name"], keys, st["pos"], st["has_gauss"], st["cached_gaussian"]))
