"""Run by torchrun in tests/test_distributed.py: train, counting gradient all-reduces per rank.

usage: torchrun --nproc_per_node=N tests/ddp_probe.py OUT_DIR [key=value ...]
Writes OUT_DIR/probe-rank{R}.pid at start and OUT_DIR/probe-rank{R}.json at the end
(exit code, optimizer steps, all-reduce calls), then exits with train's exit code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from {{ cookiecutter.package_name }} import train as train_module

ROOT = Path(__file__).resolve().parents[1]


class CountingDDP(torch.nn.parallel.DistributedDataParallel):
    allreduce_calls = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        def counting_hook(state, bucket):
            CountingDDP.allreduce_calls += 1
            return allreduce_hook(state, bucket)

        self.register_comm_hook(None, counting_hook)


def main() -> int:
    out_dir = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"probe-rank{rank}.pid").write_text(str(os.getpid()))
    torch.nn.parallel.DistributedDataParallel = CountingDDP  # train.py builds it through torch.nn.parallel
    code = train_module.main(["--config", str(ROOT / "configs" / "smoke.yaml"), f"out_dir={out_dir}", *sys.argv[2:]])
    (out_dir / f"probe-rank{rank}.json").write_text(
        json.dumps({"exit_code": code, "allreduce_calls": CountingDDP.allreduce_calls})
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
