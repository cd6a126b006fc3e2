"""The training and evaluation commands on the tests' own task (stand_in.py), for tests that need a process.

usage: python tests/stand_in_cli.py train [--augment] [key=value ...]
       python tests/stand_in_cli.py evaluate --checkpoint PATH [key=value ...]
Training takes the loop settings stand_in.LOOP, then the key=value arguments. --augment: the training
set with random augmentation (augment.py).
"""

from __future__ import annotations

import sys

import stand_in  # tests/, this script's folder
from augment import augmenting

from {{ cookiecutter.package_name }} import evaluate as evaluate_module
from {{ cookiecutter.package_name }} import train as train_module

if __name__ == "__main__":
    stand_in.install()
    command, args = sys.argv[1], sys.argv[2:]
    if command == "evaluate":
        sys.exit(evaluate_module.main(args))
    if args[:1] == ["--augment"]:
        train_module.build_datasets = augmenting(train_module.build_datasets, stand_in.VOCAB)
        args = args[1:]
    sys.exit(train_module.main([*stand_in.LOOP, *args]))
