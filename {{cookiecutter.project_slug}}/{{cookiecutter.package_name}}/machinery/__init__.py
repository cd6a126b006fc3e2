"""The machinery around the loop: what a training run needs that is not the lesson.

distributed.py  this process among torchrun's: the process group, DDP and FSDP, the ranks' agreement
loader.py       batches that resume exactly: shards, workers, streams, per-batch seeds
state.py        the state of a run (TrainState), which checkpoints save whole, and the step's bookkeeping
run_folder.py   out_dir: resume or start, config.yaml, the run's end
signals.py      stop requests: SIGTERM, Ctrl-C, the time limit
progress.py     the start block, the progress bar, the summary
profiler.py     profile_steps: a torch.profiler trace of a few steps
speed.py        tokens/s, peak memory, MFU
metrics.py      metrics.jsonl and TensorBoard
trackers.py     wandb and MLflow
files.py        atomic writes

The loop (train.py) imports the few names below; nothing here needs editing to change the step.
"""

from . import distributed, run_folder
from .loader import build_loaders, stream_part, workers_ended
from .profiler import profiling
from .progress import Progress, describe_run
from .signals import StopRequest
from .speed import Speed
from .state import TrainingError, TrainState
from .trackers import TrackerError

__all__ = [
    "Progress",
    "Speed",
    "StopRequest",
    "TrackerError",
    "TrainState",
    "TrainingError",
    "build_loaders",
    "describe_run",
    "distributed",
    "profiling",
    "run_folder",
    "stream_part",
    "workers_ended",
]
