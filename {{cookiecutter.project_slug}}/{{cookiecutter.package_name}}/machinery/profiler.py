"""``profile_steps=A-B``: a torch.profiler trace of optimizer steps A to B, the steps around them unprofiled.

The window holds whole steps, from the start of step A to the end of step B: each ``train_step`` and what
the loop does after it (logging, evaluation, saving, when due). What it writes, each process its own:

- ``out_dir/profile/trace-rank{R}.json``: the CPU and CUDA activity with tensor shapes and memory, as a
  Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing), each step marked ``ProfilerStep#N``;
- on CUDA, ``out_dir/profile/memory-rank{R}.pickle``: a snapshot of every allocation over the same steps
  (``torch.cuda.memory._record_memory_history``; drag it into https://pytorch.org/memory_viz);
- in the log (rank 0), a table of the operators that took the most time, by their own time.

The numbers the run trains and records are the same as without it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerAction, ProfilerActivity, profile

from ..essentials.config import Config, profile_window
from .distributed import Process

log = logging.getLogger(__name__)
TABLE_ROWS = 12
MEMORY_EVENTS = 100_000  # allocations kept in the CUDA memory snapshot


class StepProfiler:
    """Call ``step(state.step)`` before each optimizer step; ``close()`` at the end of the run."""

    def __init__(self, cfg: Config, device: torch.device, rank: int):
        self.window = profile_window(cfg.profile_steps)  # (A, B), or None
        self.folder = Path(cfg.out_dir) / "profile"
        self.device, self.rank = device, rank
        self.profiler: profile | None = None

    def step(self, steps_done: int) -> None:
        """Before optimizer step ``steps_done + 1``: the trace starts before step A and ends after step B."""
        if self.window is None:
            return
        first, last = self.window
        if self.profiler is None and steps_done == first - 1:
            self._start(first)
        elif self.profiler is not None and steps_done == last:
            self.close()
        elif self.profiler is not None:
            self.profiler.step()  # ends the marker of the step just done, begins the next one's

    def _start(self, first: int) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        # A schedule that always records: each step is marked ProfilerStep#N in the trace, N the optimizer step.
        self.profiler = profile(
            activities=activities,
            schedule=lambda _: ProfilerAction.RECORD,
            record_shapes=True,
            profile_memory=True,
        )
        self.profiler.step_num = first
        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_EVENTS)
        self.profiler.start()

    def close(self) -> None:
        """The end of the window, or of the run inside it: write what was profiled."""
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"trace-rank{self.rank}.json"
        profiler.export_chrome_trace(str(trace))
        if self.device.type == "cuda":
            torch.cuda.memory._dump_snapshot(str(self.folder / f"memory-rank{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        log.info("profile of steps %d-%d written to %s; the most expensive operators:", *self.window, trace.parent)
        log.info("%s", profiler.key_averages().table(sort_by=by, row_limit=TABLE_ROWS))


@contextlib.contextmanager
def profiling(cfg: Config, process: Process) -> Iterator[StepProfiler]:
    """A StepProfiler that writes what it holds on any way out of the run (a stop inside the window too)."""
    profiler = StepProfiler(cfg, process.device, process.rank)
    try:
        yield profiler
    finally:
        profiler.close()
