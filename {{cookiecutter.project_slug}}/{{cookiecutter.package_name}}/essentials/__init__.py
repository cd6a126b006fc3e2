"""The lesson: the six essentials of a training loop, each in the file named after it.

1. Config                         config.py      a dataclass, loaded from YAML, saved in every checkpoint
2. Seed                           seed.py        set once, first, for every random stream
3. Mixed precision                precision.py   autocast, and GradScaler for fp16
4. Gradient clipping              clipping.py    after unscaling, before the optimizer step
5. LR schedule                    schedule.py    warmup + cosine, OneCycle, step decay, WSD
6. Validation + best checkpoint   validation.py (measure, judge), checkpoint.py (save, resume)

and the optimizer (optimizer.py): its parameter groups, and a step that skips non-finite gradients; the weights'
moving average (ema.py), which evaluation uses.
The loop (train.py) takes what it uses from here; read each file for the how and the why.
"""

from .checkpoint import (
    CheckpointError,
    LastCheckpoint,
    load_weights,
    read_on_every_rank,
    restore_training,
    save_best,
    save_snapshot,
)
from .clipping import clip_gradients
from .config import Config, ConfigError, load_config
from .ema import WeightEMA
from .optimizer import build_optimizer, hidden_matrices, optimizer_step
from .precision import Precision, allow_tf32, fit_first_scale, resolve_precision
from .schedule import build_scheduler
from .seed import seed_everything
from .validation import check_monitor, monitor_goal, validate

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "LastCheckpoint",
    "Precision",
    "WeightEMA",
    "allow_tf32",
    "build_optimizer",
    "check_monitor",
    "build_scheduler",
    "clip_gradients",
    "fit_first_scale",
    "hidden_matrices",
    "load_config",
    "load_weights",
    "monitor_goal",
    "optimizer_step",
    "read_on_every_rank",
    "resolve_precision",
    "restore_training",
    "save_best",
    "save_snapshot",
    "seed_everything",
    "validate",
]
