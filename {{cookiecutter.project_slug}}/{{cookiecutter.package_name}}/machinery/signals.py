"""Preemption: turn SIGTERM, SIGINT and the end of ``max_time_minutes`` into a polite request to stop.

The loop checks ``stop.reason()`` after each optimizer step (under torchrun,
the ranks' requests travel during the next step and every rank stops after
it: within two steps of the signal, whatever ``log_every`` is), writes
``last.pt`` and exits with status 128 + signal number (143 for SIGTERM, 130
for SIGINT), the code shells and schedulers read as "killed by that signal",
or 124 when its time ran out (what ``timeout`` exits with). A second Ctrl-C
exits at once, without saving.
"""

from __future__ import annotations

import signal
import threading
import time

TIME_LIMIT = 124  # the stop reason, and exit status, when max_time_minutes has run out


def exit_status(reason: int) -> int:
    """0 when nothing stopped the run; 124 for the time limit; 128 + the signal's number for a signal."""
    if not reason:
        return 0
    return TIME_LIMIT if reason == TIME_LIMIT else 128 + reason


class StopRequest:
    """``max_time_minutes``: the run is asked to stop that long after this is made (0: never)."""

    def __init__(self, max_time_minutes: float = 0.0) -> None:
        self.signum: int | None = None
        self.deadline = time.perf_counter() + 60 * max_time_minutes if max_time_minutes else None
        self._previous: dict[int, object] = {}

    def reason(self) -> int:
        """Why the run should stop: the signal's number, TIME_LIMIT, or 0 to go on (a clock read, no sync)."""
        if self.signum is not None:
            return self.signum
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return TIME_LIMIT
        return 0

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: leave now
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals can only be set there
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
