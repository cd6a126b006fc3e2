"""Faults to inject into a run: a signal to this process at the Nth call of a function."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any


class SignalOnCall:
    """``function``, counting its calls, that sends ``signum`` to this process at call number ``call``."""

    def __init__(self, function: Callable[..., Any], call: int, signum: int = signal.SIGTERM):
        self.function, self.call, self.signum, self.calls = function, call, signum, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.call:
            os.kill(os.getpid(), self.signum)
        return self.function(*args, **kwargs)
