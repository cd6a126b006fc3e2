"""Run by torchrun in tests/test_distributed.py: train the tests' own task, recording what each rank
sends to the others.

usage: torchrun --nproc_per_node=N tests/ddp_probe.py OUT_DIR [key=value ...]
The loop settings are stand_in.LOOP, then the key=value arguments. Writes OUT_DIR/probe-rank{R}.pid
at start, OUT_DIR/probe-rank{R}.training at the first micro-batch and OUT_DIR/probe-rank{R}.json at
the end: the exit code, DDP's gradient all-reduces, FSDP's gradient reduce-scatters, the optimizer
steps taken, the DDP models still alive once train returned, and every other collective
("name:elements") by the optimizer step it came after. Then exits with train's exit code.
Faults to inject, from the environment: PROBE_NAN_AT=RANK:STEP makes that rank's loss NaN in the
first micro-batch of that optimizer step; PROBE_CONFIG_ERROR_ON=RANK raises a ConfigError on that
rank alone while the datasets are built; PROBE_NO_CHECKPOINT_ON=RANK makes that rank see no
checkpoint to resume from (a node with a disk of its own); PROBE_UNREADABLE_ON=RANK makes that
rank unable to read the checkpoint; PROBE_SIGTERM_IN_EVAL=RANK sends that rank a SIGTERM during
its first evaluation; PROBE_SIGTERM_AT=RANK:STEP sends that rank a SIGTERM in that optimizer step;
PROBE_KILL_AT=RANK:STEP kills that rank (SIGKILL) in that optimizer step, in torchrun's first launch only;
PROBE_CRASH_IN_SAVE=N makes the N-th sharded save in the background fail once its shards are written, before
the commit, on every rank (a crash then).
PROBE_NODE_DISKS=FOLDER runs rank R in FOLDER/nodeR, where a relative OUT_DIR is a folder of its own;
PROBE_EXTRA_TOTAL_ON=RANK makes that rank's metric_totals return one name more than the others'.
PROBE_GRADIENT_BYTES=1 measures the gradient bytes held in step 2's last micro-batch, after its forward.
PROBE_RANK_DRAWS=1 makes each rank draw rank + 1 numbers from torch's, NumPy's and Python's global streams
while its datasets are built (as a data.py that shuffles its shard list may). PROBE_ACCELERATOR=TYPE makes
torch name TYPE as this machine's accelerator (torch._C._get_accelerator), as a GPU machine would.
The report holds the rank's peak resident memory (VmHWM) too, read from /proc as the rank ends, and a hash of
torch's CPU random stream as its first micro-batch begins (each rank has its own).
"""

from __future__ import annotations

import collections
import gc
import hashlib
import json
import os
import signal
import sys
from concurrent.futures import Future
from pathlib import Path

import stand_in  # tests/, this script's folder
import torch
import torch.distributed as dist
from faults import SignalOnCall, drawing_first, peak_resident_kib
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
{%- if cookiecutter.loop == "plain" %}
from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fsdp_param_group
{%- endif %}
from torch.distributed.tensor import DTensor

from {{ cookiecutter.package_name }} import train as train_module
from {{ cookiecutter.package_name }}.essentials import checkpoint as checkpoint_module
from {{ cookiecutter.package_name }}.essentials import validation as validation_module
from {{ cookiecutter.package_name }}.essentials.checkpoint import CheckpointError
from {{ cookiecutter.package_name }}.essentials.config import ConfigError
from {{ cookiecutter.package_name }}.machinery import run_folder

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "reduce", "gather", "gather_object", "scatter", "reduce_scatter", "all_to_all")  # fmt: skip


class CountingDDP(torch.nn.parallel.DistributedDataParallel):
    allreduce_calls = 0
    in_hook = False  # the hook's own all_reduce is counted here, not with the other collectives

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        def counting_hook(state, bucket):
            CountingDDP.allreduce_calls += 1
            CountingDDP.in_hook = True
            try:
                return allreduce_hook(state, bucket)
            finally:
                CountingDDP.in_hook = False

        self.register_comm_hook(None, counting_hook)


def gradient_bytes() -> int:
    """The bytes of the gradients this process holds: of every parameter alive, the model's (under FSDP its
    shards) and FSDP's own whole ones, each storage once, a DTensor's through its local shard."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Parameter) and obj.grad is not None:
            grad = obj.grad.to_local() if isinstance(obj.grad, DTensor) else obj.grad
            storages[grad.untyped_storage().data_ptr()] = grad.untyped_storage().nbytes()
    return sum(storages.values())


def crashing_at(async_save, save: int):
    """DCP's ``async_save`` whose ``save``-th write fails once written, as a process killed before its commit."""
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        written = async_save(*args, **kwargs)
        if calls["n"] != save:
            return written
        crashed = Future()
        written.add_done_callback(lambda _: crashed.set_exception(RuntimeError("the process was killed")))
        return crashed

    return crashing


def main() -> int:
    rank = int(os.environ["RANK"])
    # When one rank exits with an error, torchrun stops the others with SIGTERM: a rank that has reached the same
    # error a moment later must still write its report. During train() the loop's own handler takes over.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("PROBE_NODE_DISKS"):  # each rank in a folder of its own, as on a node with its own disk
        os.chdir(Path(os.environ["PROBE_NODE_DISKS"], f"node{rank}"))
    out_dir = Path(sys.argv[1])
    overrides = dict(arg.split("=", 1) for arg in sys.argv[2:])
    accum_steps = int(overrides.get("accum_steps", 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"probe-rank{rank}.pid").write_text(str(os.getpid()))
    torch.nn.parallel.DistributedDataParallel = CountingDDP  # train.py builds it through torch.nn.parallel
    stand_in.install()
{%- if cookiecutter.loop == "plain" %}
    # FSDP's gradient reduce-scatters, one call per sharded unit each time gradients are synced.
    reduce_scatters = {"n": 0}
    real_reduce = fsdp_param_group.foreach_reduce

    def counting_reduce(*args, **kwargs):
        reduce_scatters["n"] += 1
        return real_reduce(*args, **kwargs)

    fsdp_param_group.foreach_reduce = counting_reduce
{%- endif %}

    micro_batches = {"n": 0}
    collectives: dict[int, list[str]] = collections.defaultdict(list)

    def counted(name, original):
        def collective(*args, **kwargs):
            if not CountingDDP.in_hook:
                size = args[0].numel() if args and isinstance(args[0], torch.Tensor) else "-"
                collectives[micro_batches["n"] // accum_steps].append(f"{name}:{size}")  # the step it follows
            return original(*args, **kwargs)

        return collective

    for name in COLLECTIVES:
        setattr(dist, name, counted(name, getattr(dist, name)))

    nan_rank, _, nan_step = os.environ.get("PROBE_NAN_AT", "-1:-1").partition(":")
    real_loss = train_module.compute_loss

    held: list[int] = []  # PROBE_GRADIENT_BYTES: at step 2's last micro-batch
    random_streams: list[str] = []  # torch's CPU stream as the first micro-batch begins, hashed

    def loss(output, target):
        micro_batches["n"] += 1
        if micro_batches["n"] == 1:
            (out_dir / f"probe-rank{rank}.training").touch()  # the loop is under way
            random_streams.append(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
        if os.environ.get("PROBE_GRADIENT_BYTES") and micro_batches["n"] == 2 * accum_steps:
            held.append(gradient_bytes())  # what the step's earlier micro-batches left (zero_grad freed the rest)
        value, count = real_loss(output, target)
        if rank == int(nan_rank) and micro_batches["n"] == (int(nan_step) - 1) * accum_steps + 1:
            value = value * float("nan")
        return value, count

    kill_rank, _, kill_step = os.environ.get("PROBE_KILL_AT", "-1:-1").partition(":")
    if int(kill_rank) == rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":  # the first launch
        train_module.compute_loss = SignalOnCall(loss, (int(kill_step) - 1) * accum_steps + 1, signal.SIGKILL)
    else:
        train_module.compute_loss = loss
    term_rank, _, term_step = os.environ.get("PROBE_SIGTERM_AT", "-1:-1").partition(":")
    if int(term_rank) == rank:
        train_module.compute_loss = SignalOnCall(loss, (int(term_step) - 1) * accum_steps + 1)
    optimizers = []  # to read how many steps the optimizer took (skipped ones are not counted in its state)
    real_build = train_module.build_optimizer

    def recording_build(*args):
        optimizers.append(real_build(*args))
        return optimizers[-1]

    train_module.build_optimizer = recording_build
    if os.environ.get("PROBE_CONFIG_ERROR_ON") == str(rank):

        def failing_datasets(cfg):
            raise ConfigError("the data folder is missing on this node")

        train_module.build_datasets = failing_datasets

    if os.environ.get("PROBE_RANK_DRAWS"):
        train_module.build_datasets = drawing_first(train_module.build_datasets, rank + 1)
    if os.environ.get("PROBE_ACCELERATOR"):
        accelerator = torch.device(os.environ["PROBE_ACCELERATOR"])
        torch._C._get_accelerator = lambda: accelerator
    if os.environ.get("PROBE_NO_CHECKPOINT_ON") == str(rank):
        run_folder.resume_checkpoint_path = lambda cfg: None
    if os.environ.get("PROBE_UNREADABLE_ON") == str(rank):

        def unreadable(path):
            raise CheckpointError(f"checkpoint {path} is unreadable on this node")

        checkpoint_module.load_checkpoint = unreadable

    if os.environ.get("PROBE_CRASH_IN_SAVE"):
        crash_in = int(os.environ["PROBE_CRASH_IN_SAVE"])
        checkpoint_module.dcp.async_save = crashing_at(checkpoint_module.dcp.async_save, crash_in)
    if os.environ.get("PROBE_EXTRA_TOTAL_ON") == str(rank):
        real = validation_module.metric_totals
        validation_module.metric_totals = lambda output, target, task: {**real(output, target, task), "extra": 1}
    if os.environ.get("PROBE_SIGTERM_IN_EVAL") == str(rank):
        validation_module.metric_totals = SignalOnCall(validation_module.metric_totals, 2)  # in the second batch

    code = train_module.main([*stand_in.LOOP, f"out_dir={out_dir}", *sys.argv[2:]])
    moments = [state for optimizer in optimizers for state in optimizer.state.values()]
    models_left = sum(isinstance(o, CountingDDP) for o in gc.get_objects())  # none: freed before the group
    (out_dir / f"probe-rank{rank}.json").write_text(
        json.dumps({
            "exit_code": code,
            "allreduce_calls": CountingDDP.allreduce_calls,
{%- if cookiecutter.loop == "plain" %}
            "reduce_scatter_calls": reduce_scatters["n"],
{%- endif %}
            "steps_taken": int(moments[0].get("step", 0)) if moments else 0,  # SGD does not count them
            "models_left": models_left,
            "gradient_bytes_held": held[0] if held else None,
            "collectives_after_step": collectives,
            "stream_read": stand_in.SequenceStream.read,  # with STAND_IN_STREAM and no workers: what this rank read
            "peak_resident_kib": peak_resident_kib(),
            "random_stream_at_start": random_streams[0] if random_streams else None,
        })
    )  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
