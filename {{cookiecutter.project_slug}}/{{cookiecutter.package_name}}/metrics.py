"""``metrics.jsonl``: one JSON object per line, the run's source of truth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop records past the checkpoint's step (they will be logged again) and any torn last line."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write(self.path, lambda f: f.write("".join(kept).encode()))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
