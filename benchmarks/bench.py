"""How much the generated loop costs over a bare loop, measured side by side.

    scripts/bench [--rounds N] [--quick | --smoke]

Bakes a project from this checkout with each loop (plain, accelerate), then for
each task, precision and accumulation setting trains the same model on the same
data for the same number of optimizer steps with
  (a) a bare loop written here: forward, loss, backward, step, zero_grad
      (with the same autocast for bf16, and the loss divided for accumulation),
  (b) the plain project's own train() with every essential on: schedule,
      clipping, non-finite guard, accumulation, logging, periodic checkpoints, and
  (c) the accelerate project's train(), the same essentials on Accelerate,
in interleaved rounds (a b c a b c ...). Training speed is the median steps per
second; the generated loops' time excludes evaluation and checkpoint writing,
which are measured apart (plain project; the accelerate one shares that code): its
evaluation against a bare no_grad forward loop over the same batches, and its
atomic best.pt save against a plain torch.save. The recipes are timed on the
transformer: the plain project's time per step with ema_decay and with
optimizer=muon against AdamW alone, interleaved. Start-up is the median wall time
of `python -m <package>.train` for one step, and of importing the loop, for each
project; code lines are counted per essential (loc.py).
Prints tables and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1]
TARGETS = {"mlp": {1: 0.85, 4: 0.93}, "transformer": {1: 0.97, 4: 0.97}}
# Where a goal is not met, the least that must hold. The MLP with one micro-batch is almost all loop overhead, and
# torch's own clipping (kept: idiomatic, FSDP-ready, no cost on the transformer) costs it 3%: its floor is 0.75.
FLOORS = {"mlp": {1: 0.75}}
EVAL_TARGET, SAVE_TARGET = 1.10, 1.5


PROJECTS = {"plain": "Bench Project", "accelerate": "Bench Accelerate"}  # packages bench_project, bench_accelerate


def bake(where: Path, loop: str) -> Path:
    from cookiecutter.main import cookiecutter

    return Path(
        cookiecutter(
            str(TEMPLATE),
            no_input=True,
            output_dir=str(where),
            extra_context={"project_name": PROJECTS[loop], "loop": loop, "run_smoke_test": False},
            default_config=True,
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds per setting, times the task's rounds_multiplier"
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps, for a rough look")
    parser.add_argument("--smoke", action="store_true", help="one round of a few steps: checks that it runs, no more")
    args = parser.parse_args()
    rounds = 1 if args.smoke else 3 if args.quick else args.rounds
    divisor = 30 if args.smoke else 3 if args.quick else 1

    with tempfile.TemporaryDirectory(prefix="blank-loop-bench-") as tmp:
        projects = {loop: bake(Path(tmp), loop) for loop in PROJECTS}
        sys.path[:0] = [str(path) for path in projects.values()]
        sys.dont_write_bytecode = True
        modules = {
            "train": "train",
            "validation": "essentials.validation",
            "config": "essentials.config",
            "checkpoint": "essentials.checkpoint",
            "precision": "essentials.precision",
            "seed": "essentials.seed",
            "loader": "machinery.loader",
            "distributed": "machinery.distributed",
        }
        mods = {name: importlib.import_module(f"bench_project.{path}") for name, path in modules.items()}
        accelerate_mods = {
            name: importlib.import_module(f"bench_accelerate.{modules[name]}") for name in ("train", "validation")
        }
        mods["accelerate"] = accelerate_mods
        import torch
        from loc import code_lines_by_essential  # noqa: E402  (benchmarks/, next to this file)
        from tasks import TASKS  # noqa: E402

        torch.set_num_threads(1)
        device = mods["precision"].resolve_device("auto")
        results = []
        for task in TASKS.values():
            steps = max(2, task.steps // divisor)
            for precision in ("fp32", "bf16"):
                for accum in (1, 4):
                    row = measure_training(mods, task, device, precision, accum, steps,
                                           rounds * task.rounds_multiplier, Path(tmp))  # fmt: skip
                    results.append(row)
        # Evaluation and saving take a fraction of a second: more rounds for a steadier median.
        extras = measure_eval_and_save(mods, TASKS["transformer"], device, 3 * rounds, Path(tmp))
        transformer = TASKS["transformer"]
        extras["recipes"] = measure_recipes(mods, transformer, device, max(2, transformer.steps // divisor),
                                            rounds * transformer.rounds_multiplier, Path(tmp))  # fmt: skip
        extras["startup"] = measure_startup(projects, 1 if args.smoke else 5, Path(tmp), warm_up=not args.smoke)
        extras["code_lines"] = {loop: code_lines_by_essential(path) for loop, path in projects.items()}
    report(results, extras, device)
    return 0


def make_config(mods, task, device, precision: str, accum: int, steps: int, out_dir: Path, *extra: str):
    overrides = [f"out_dir={out_dir}", f"device={device.type}", f"precision={precision}", f"accum_steps={accum}",
                 f"max_steps={steps}", f"warmup_steps={min(10, steps)}", "log_every=50", f"eval_every={steps}",
                 f"ckpt_every={max(1, steps // 2)}", "clip_grad_norm=1.0", *task.overrides, *extra]  # fmt: skip
    return mods["config"].load_config(None, overrides)


@contextlib.contextmanager
def task_installed(mods, task):
    """Point a generated project's user-replaced parts (data, model, loss, metric) at the task's, if it has them."""
    patches = {("train", "build_datasets"): task.build_datasets, ("train", "build_model"): task.build_model,
               ("train", "compute_loss"): task.compute_loss, ("validation", "metric_totals"): task.metric_totals,
               ("validation", "compute_metrics"): task.compute_metrics}  # fmt: skip
    saved = {}
    for (module, name), value in patches.items():
        if value is not None:
            saved[(module, name)] = getattr(mods[module], name)
            setattr(mods[module], name, value)
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(mods[module], name, value)


def measure_startup(projects: dict[str, Path], rounds: int, tmp: Path, warm_up: bool = True) -> dict:
    """Median wall seconds, interleaved over the projects: importing the loop, and a whole 1-step run."""
    commands = {}
    for loop, path in projects.items():
        package = path.name.replace("-", "_")
        run = ["-m", f"{package}.train", "--config", "configs/smoke.yaml", "device=cpu", "max_steps=1",
               "warmup_steps=0", "eval_every=1", "overwrite=true"]  # fmt: skip
        commands[loop] = {"import": ["-c", f"import {package}.train"], "one_step": run}
    seconds = {(loop, kind): [] for loop in commands for kind in ("import", "one_step")}
    for i in range(rounds + warm_up):  # round 0 warms the file cache
        for loop, kinds in commands.items():
            for kind, args in kinds.items():
                extra = [f"out_dir={tmp / f'startup-{loop}'}"] if kind == "one_step" else []
                started = time.perf_counter()
                subprocess.run([sys.executable, *args, *extra], cwd=projects[loop], check=True, capture_output=True)
                if i >= warm_up:
                    seconds[(loop, kind)].append(time.perf_counter() - started)
    return {loop: {kind: round(statistics.median(seconds[(loop, kind)]), 2) for kind in ("import", "one_step")}
            for loop in commands}  # fmt: skip


def part(mods, task, name: str):
    """The task's data/model/loss function, or the generated project's own."""
    module = {"build_datasets": "train", "build_model": "train", "compute_loss": "train"}[name]
    return getattr(task, name) or getattr(mods[module], name)


def bare_loop(mods, task, cfg, device) -> float:
    """Steps per second of the minimal loop on the same model, data, DataLoader and optimizer."""
    mods["seed"].seed_everything(cfg.seed)
    train_set, val_set = part(mods, task, "build_datasets")(cfg)
    model = part(mods, task, "build_model")(cfg).to(device)
    compute_loss = part(mods, task, "compute_loss")
    optimizer = mods["train"].build_optimizer(model, cfg, device)
    alone = mods["distributed"].Process(device=device)
    batches, _ = mods["loader"].build_loaders(cfg, train_set, val_set, alone)
    precision = mods["precision"].resolve_precision(cfg.precision, device)
    model.train()
    started = 0.0
    for step in range(cfg.max_steps):
        if step == 1:  # timed from the end of the first step, as the loop's throughput is: it also starts things up
            synchronize(device)
            started = time.perf_counter()
        for _ in range(cfg.accum_steps):
            inputs, targets = next(batches)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with precision.autocast():
                loss_sum, count = compute_loss(model(inputs), targets)
            loss = loss_sum / count  # the textbook loop: each micro-batch's mean, divided by accum_steps
            if cfg.accum_steps > 1:
                loss = loss / cfg.accum_steps
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return (cfg.max_steps - 1) / (time.perf_counter() - started)


def generated_loop(mods, task, cfg) -> float:
    with task_installed(mods, task):
        summary = mods["train"].train(cfg)
    return (cfg.max_steps - 1) / summary["train_seconds"]  # the steps after the first, which train_seconds times


def accelerate_loop(mods, task, cfg) -> float:
    from accelerate.state import AcceleratorState

    try:
        return generated_loop(mods["accelerate"], task, cfg)  # the same config: both projects read the same fields
    finally:  # Accelerate sets its state (the precision) once per process; each run here chooses its own
        AcceleratorState._reset_state(reset_partial_state=True)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training(mods, task, device, precision, accum, steps, rounds, tmp: Path) -> dict:
    bare, loop, accelerate = [], [], []
    for i in range(rounds + 1):  # round 0 warms up all three (first-touch memory, lazy imports)
        name = f"{task.name}-{precision}-{accum}-{i}"
        cfg = make_config(mods, task, device, precision, accum, steps, tmp / name)
        b, g = bare_loop(mods, task, cfg, device), generated_loop(mods, task, cfg)
        a = accelerate_loop(mods, task, make_config(mods, task, device, precision, accum, steps, tmp / f"acc-{name}"))
        if i:
            bare.append(b)
            loop.append(g)
            accelerate.append(a)
    bare_sps, loop_sps, acc_sps = statistics.median(bare), statistics.median(loop), statistics.median(accelerate)
    row = {"task": task.name, "precision": precision, "accum_steps": accum, "steps": steps,
           "bare_steps_per_s": round(bare_sps, 1), "loop_steps_per_s": round(loop_sps, 1),
           "ratio": round(loop_sps / bare_sps, 3), "target": TARGETS[task.name][accum], "rounds": rounds,
           "accelerate_steps_per_s": round(acc_sps, 1), "accelerate_ratio": round(acc_sps / bare_sps, 3)}  # fmt: skip
    if device.type == "cuda":
        cfg = make_config(mods, task, device, precision, accum, steps, tmp / "x")
        samples = cfg.batch_size * accum
        row["samples_per_s"] = round(loop_sps * samples, 1)
        if task.flops_per_sample:
            peak = peak_flops(device, precision)
            if peak:
                row["mfu"] = round(loop_sps * samples * task.flops_per_sample(cfg) / peak, 4)
    print(f"  {task.name:11s} {precision} accum {accum}: loop/bare {row['ratio']:.3f}, "
          f"accelerate/bare {row['accelerate_ratio']:.3f}", file=sys.stderr)  # fmt: skip
    return row


RECIPES = {"adamw": (), "ema_decay=0.999": ("ema_decay=0.999",), "optimizer=muon": ("optimizer=muon",)}


def measure_recipes(mods, task, device, steps: int, rounds: int, tmp: Path) -> dict:
    """The generated loop's time per step with a weight EMA, and with Muon, against AdamW alone (fp32, one
    micro-batch), in interleaved rounds; and the memory the EMA holds: one copy of the trainable weights."""
    seconds = {name: [] for name in RECIPES}
    for i in range(rounds + 1):  # round 0 warms up
        for name, extra in RECIPES.items():
            cfg = make_config(mods, task, device, "fp32", 1, steps, tmp / f"recipe-{i}-{name}", *extra)
            per_second = generated_loop(mods, task, cfg)
            if i:
                seconds[name].append(1 / per_second)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    cfg = make_config(mods, task, device, "fp32", 1, steps, tmp / "x")
    model = part(mods, task, "build_model")(cfg)
    ema_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    print(f"  {task.name:11s} recipes: " + ", ".join(f"{n} {median[n] * 1e3:.1f} ms" for n in median), file=sys.stderr)
    return {
        "task": task.name, "rounds": rounds, "steps": steps,
        "ms_per_step": {name: round(value * 1e3, 2) for name, value in median.items()},
        "ratio_to_adamw": {name: round(value / median["adamw"], 3) for name, value in median.items()},
        "ema_mb": round(ema_bytes / 2**20, 2),
    }  # fmt: skip


def measure_eval_and_save(mods, task, device, rounds, tmp: Path) -> dict:
    """The generated evaluate() against a bare no_grad forward loop; save_checkpoint against torch.save."""
    import torch

    cfg = make_config(mods, task, device, "fp32", 1, 20, tmp / "eval")
    with task_installed(mods, task):
        mods["train"].train(cfg)  # a trained model and a real checkpoint to time
    state = torch.load(Path(cfg.out_dir) / "last.pt", weights_only=True)
    model = part(mods, task, "build_model")(cfg).to(device)
    model.load_state_dict(state["model"])
    train_set, val_set = part(mods, task, "build_datasets")(cfg)
    alone = mods["distributed"].Process(device=device)
    _, val_loaders = mods["loader"].build_loaders(cfg, train_set, val_set, alone)
    val_loader = val_loaders[""]  # the task's one validation set
    precision = mods["precision"].resolve_precision("fp32", device)

    def bare_eval() -> None:
        model.eval()
        with torch.no_grad():
            for inputs, _ in val_loader:
                model(inputs.to(device, non_blocking=True))
        synchronize(device)

    def our_eval() -> None:
        with task_installed(mods, task):
            mods["validation"].evaluate(model, val_loader, device, precision, cfg.task)

    plain_path, atomic_path = tmp / "plain.pt", tmp / "atomic.pt"

    def plain_save() -> None:
        torch.save(state, plain_path)

    def atomic_save() -> None:
        mods["checkpoint"].save_checkpoint(state, atomic_path)

    timings = {name: [] for name in ("bare_eval", "eval", "torch_save", "save_checkpoint")}
    for i in range(rounds + 1):
        for name, fn in (("bare_eval", bare_eval), ("eval", our_eval), ("torch_save", plain_save),
                         ("save_checkpoint", atomic_save)):  # fmt: skip
            started = time.perf_counter()
            fn()
            if i:
                timings[name].append(time.perf_counter() - started)
    med = {name: statistics.median(values) for name, values in timings.items()}
    return {
        "eval_seconds": round(med["eval"], 5), "bare_eval_seconds": round(med["bare_eval"], 5),
        "eval_ratio": round(med["eval"] / med["bare_eval"], 3), "eval_target": EVAL_TARGET,
        "save_seconds": round(med["save_checkpoint"], 5), "torch_save_seconds": round(med["torch_save"], 5),
        "save_ratio": round(med["save_checkpoint"] / med["torch_save"], 3), "save_target": SAVE_TARGET,
        "checkpoint_mb": round(os.path.getsize(atomic_path) / 2**20, 2),
    }  # fmt: skip


def peak_flops(device, precision: str) -> float | None:
    """Dense peak FLOP/s of known GPUs (bf16 tensor cores; fp32 runs as TF32), or None."""
    import torch

    name = torch.cuda.get_device_name(device)
    table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
    for key, bf16 in table.items():
        if key in name:
            return bf16 if precision == "bf16" else bf16 / 2
    return None


def report(rows: list[dict], extras: dict, device) -> None:
    rounds = ", ".join(sorted({f"{r['task']} {r['rounds']}" for r in rows}))
    print(f"\nblank-loop benchmark on {device.type}, 1 thread, medians of interleaved rounds ({rounds})\n")
    head = "| task | precision | accum | bare steps/s | loop steps/s | loop / bare | target | accelerate / bare |"
    print(head)
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        floor = FLOORS.get(r["task"], {}).get(r["accum_steps"])
        ok = "ok" if r["ratio"] >= r["target"] else f"above floor {floor}" if floor and r["ratio"] >= floor else "BELOW"
        print(f"| {r['task']} | {r['precision']} | {r['accum_steps']} | {r['bare_steps_per_s']:.0f} | "
              f"{r['loop_steps_per_s']:.0f} | {r['ratio']:.3f} | >= {r['target']} {ok} | "
              f"{r['accelerate_ratio']:.3f} |")  # fmt: skip
    print(
        f"\nevaluation: {extras['eval_seconds'] * 1e3:.1f} ms vs bare no_grad forward "
        f"{extras['bare_eval_seconds'] * 1e3:.1f} ms: {extras['eval_ratio']:.3f}x (target <= {EVAL_TARGET})"
    )
    print(f"best.pt save ({extras['checkpoint_mb']} MB, atomic + fsync): {extras['save_seconds'] * 1e3:.1f} ms vs "
          f"torch.save {extras['torch_save_seconds'] * 1e3:.1f} ms: {extras['save_ratio']:.3f}x "
          f"(target <= {SAVE_TARGET})")  # fmt: skip
    recipes = extras["recipes"]
    recipe_rounds = recipes["rounds"]
    print(f"\nrecipes on the {recipes['task']} (fp32, 1 micro-batch), median ms per step of {recipe_rounds} rounds:")
    print("| setting | ms per step | / adamw |")
    for name, ms in recipes["ms_per_step"].items():
        print(f"| {name} | {ms:.1f} | {recipes['ratio_to_adamw'][name]:.3f} |")
    print(f"the weight EMA holds {recipes['ema_mb']} MB more: one copy of the trainable weights")
    print("\nstart-up, median wall seconds: | loop | import the loop | a 1-step run (smoke config) |")
    for loop, times in extras["startup"].items():
        print(f"| {loop} | {times['import']:.2f} | {times['one_step']:.2f} |")
    print("\ncode lines (no comments, blank lines or docstrings) by essential:")
    print("| essential | " + " | ".join(extras["code_lines"]) + " |")
    for essential in next(iter(extras["code_lines"].values())):
        print(f"| {essential} | " + " | ".join(str(c[essential]) for c in extras["code_lines"].values()) + " |")
    print(json.dumps({"device": device.type, "training": rows, **extras}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
