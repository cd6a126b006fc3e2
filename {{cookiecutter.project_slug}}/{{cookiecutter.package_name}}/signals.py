"""Preemption: turn SIGTERM and SIGINT into a polite request to stop.

The loop checks ``stop.signum`` after each optimizer step (under torchrun,
the ranks agree on it at log, evaluation and checkpoint steps, so that every
rank stops at the same step), writes ``last.pt`` and exits with status
128 + signal number (143 for SIGTERM, 130 for SIGINT), the code shells and
schedulers read as "killed by that signal".
A second Ctrl-C exits at once, without saving.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

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
