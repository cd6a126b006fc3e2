"""The training and evaluation commands on the tests' own task (stand_in.py), for tests that need a process.

usage: python tests/stand_in_cli.py train [--augment] [--fail=WHERE:N] [key=value ...]
       python tests/stand_in_cli.py evaluate [--fail=metrics:N] --checkpoint PATH [key=value ...]
Training takes the loop settings stand_in.LOOP, then the key=value arguments. --augment: the training
set with random augmentation (augment.py). --fail: the user's code raises an error (faults.py) at its N-th
call: WHERE is loss (compute_loss), metrics (metric_totals) or data (a training sample, in a worker if any).
With STAND_IN_REPORT_PEAK set, the last line on stderr is the process's peak resident memory in KiB; with
STAND_IN_SLOW_FSYNC=SECONDS, every fsync takes that much longer (a slow disk).
"""

from __future__ import annotations

import os
import sys

import stand_in  # tests/, this script's folder
from augment import augmenting
from faults import FailOnCall, failing_training_set, peak_resident_kib, slowed

from {{ cookiecutter.package_name }} import evaluate as evaluate_module
from {{ cookiecutter.package_name }} import train as train_module
from {{ cookiecutter.package_name }}.essentials import validation as validation_module


def inject_failure(where: str, call: int) -> None:
    if where == "loss":
        train_module.compute_loss = FailOnCall(train_module.compute_loss, call, "compute_loss")
    elif where == "metrics":
        validation_module.metric_totals = FailOnCall(validation_module.metric_totals, call, "metric_totals")
    else:
        for module in (train_module, evaluate_module):
            module.build_datasets = failing_training_set(module.build_datasets, call)


if __name__ == "__main__":
    stand_in.install()
    if os.environ.get("STAND_IN_SLOW_FSYNC"):
        os.fsync = slowed(os.fsync, float(os.environ["STAND_IN_SLOW_FSYNC"]))
    command, args = sys.argv[1], sys.argv[2:]
    if args[:1] and args[0].startswith("--fail="):
        where, _, call = args[0].removeprefix("--fail=").partition(":")
        inject_failure(where, int(call))
        args = args[1:]
    if command == "evaluate":
        sys.exit(evaluate_module.main(args))
    if args[:1] == ["--augment"]:
        train_module.build_datasets = augmenting(train_module.build_datasets, stand_in.VOCAB)
        args = args[1:]
    code = train_module.main([*stand_in.LOOP, *args])
    if os.environ.get("STAND_IN_REPORT_PEAK"):
        print(f"peak resident KiB: {peak_resident_kib()}", file=sys.stderr)
    sys.exit(code)
