"""After generation: drop the LICENSE when none was chosen, then prove the loop trains.

The smoke run uses the new project's own code and configs/smoke.yaml, without
installing it, in a temporary folder that is removed afterwards. It checks
that the model learned and that best.pt reloads to the metric it recorded.
"""

import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

LICENSE = "{{ cookiecutter.license }}"
RUN_SMOKE_TEST = "{{ cookiecutter.run_smoke_test }}" == "True"  # a real boolean from cookiecutter >= 2.7
PACKAGE = "{{ cookiecutter.package_name }}"
MIN_VAL_ACC = 0.9  # the synthetic task is easy: a working loop passes this with room to spare

if LICENSE == "none":
    Path("LICENSE").unlink()


def smoke_test() -> int:
    started = time.perf_counter()
    missing = []
    for module, package in (("torch", "torch"), ("yaml", "pyyaml"), ("tqdm", "tqdm")):
        try:
            importlib.import_module(module)  # torch first: the slow part of start-up, timed with the rest
        except ImportError:
            missing.append(package)
    if missing:
        print(
            f"smoke training skipped: {', '.join(missing)} not installed. Install PyTorch "
            "(https://pytorch.org/get-started/locally/), then in the project: pip install -e .\n"
            f"and run: python -m {PACKAGE}.train --config configs/smoke.yaml"
        )
        return 0
    sys.dont_write_bytecode = True  # leave no __pycache__ in the new project
    sys.path.insert(0, os.getcwd())
    config = importlib.import_module(f"{PACKAGE}.essentials.config")
    train = importlib.import_module(f"{PACKAGE}.train")
    evaluate = importlib.import_module(f"{PACKAGE}.evaluate")

    with tempfile.TemporaryDirectory(prefix="smoke-") as tmp:
        try:
            cfg = config.load_config("configs/smoke.yaml", [f"out_dir={tmp}/run"])
            summary = train.train(cfg)
            recorded = summary["metrics"]
            reloaded = evaluate.evaluate_checkpoint(Path(tmp) / "run" / "best.pt")
        except Exception as e:  # report any failure in one line, then fail the generation
            print(f"smoke training failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    acc = recorded.get("val_acc", 0.0)
    if acc < MIN_VAL_ACC:
        print(
            f"smoke training failed: val_acc {acc:.3f} after {summary['step']} steps (expected >= {MIN_VAL_ACC})",
            file=sys.stderr,
        )
        return 1
    if reloaded[cfg.monitor] != summary["best_metric"]:
        print(
            f"smoke training failed: best.pt reloads to {cfg.monitor}={reloaded[cfg.monitor]!r}, "
            f"but {summary['best_metric']!r} was recorded",
            file=sys.stderr,
        )
        return 1
    print(
        f"smoke training passed: {summary['step']} steps, {time.perf_counter() - started:.1f}s, "
        f"val_acc {acc:.3f}, best {cfg.monitor} {summary['best_metric']:.4f} reproduced from best.pt"
    )
    return 0


if RUN_SMOKE_TEST:
    sys.exit(smoke_test())
