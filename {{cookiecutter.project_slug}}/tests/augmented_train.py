"""The training command, with random augmentation in the training set (tests/augment.py).

usage: python tests/augmented_train.py --config ... [key=value ...]
"""

from __future__ import annotations

import sys

from augment import augmenting  # tests/, this script's folder

from {{ cookiecutter.package_name }} import train as train_module

if __name__ == "__main__":
    train_module.build_datasets = augmenting(train_module.build_datasets)
    sys.exit(train_module.main(sys.argv[1:]))
