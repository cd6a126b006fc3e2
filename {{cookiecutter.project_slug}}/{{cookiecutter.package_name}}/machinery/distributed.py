{% if cookiecutter.loop == "plain" -%}
"""Data-parallel training under torchrun: the same loop and config on one process or many.

    torchrun --standalone --nproc_per_node=N -m {{ cookiecutter.package_name }}.train --config ...

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; with WORLD_SIZE > 1 each
process takes one device (cuda:LOCAL_RANK on GPUs, with NCCL; the CPU with
gloo) and the model is wrapped in DistributedDataParallel, or sharded with FSDP2
(``parallel=fsdp``). A plain
``python -m`` run (or a world of one) sets nothing up and behaves as before.
"""
{%- else -%}
"""The device and the processes, through Hugging Face Accelerate, under ``accelerate launch`` or torchrun.

``setup`` makes the ``Accelerator`` (it picks each process's device, joins the
processes and holds the mixed-precision settings); ``Process`` is this process's
place among them, with the ranks' agreement (stop requests, what to resume
from) over the process group Accelerate joined.
"""
{%- endif %}

from __future__ import annotations

{% if cookiecutter.loop == "plain" -%}
import contextlib
import gc
import os
from collections.abc import Callable, Iterator
{%- else -%}
import gc
import logging
import os
from collections.abc import Callable
{%- endif %}
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
{%- if cookiecutter.loop == "accelerate" %}
from accelerate import Accelerator, DistributedType
{%- endif %}
from torch import nn
{%- if cookiecutter.loop == "plain" %}
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
{%- endif %}

from ..essentials.config import Config, ConfigError
{%- if cookiecutter.loop == "plain" %}
from ..essentials.precision import Precision, resolve_device
{%- else %}
from ..essentials.precision import resolve_device, resolve_precision
{%- endif %}
from .signals import StopRequest
{%- if cookiecutter.loop == "accelerate" %}

log = logging.getLogger(__name__)
{%- endif %}


@dataclass
class Process:
    """This process among the run's processes: its rank, their number (``world_size``), its device, and how the
    processes agree (stop requests, what to resume from) without waiting on the GPU."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # A gloo group for host-side agreement (stop requests, save results), so that
    # deciding them never waits on the GPU stream.
    control: Any = field(default=None, repr=False)
    # A gloo group of its own for the collectives of sharded saves in the background (parallel=fsdp's last),
    # which run in a thread beside training's: with a longer timeout, as a save may take longer than a step.
    saves: Any = field(default=None, repr=False)
{%- if cookiecutter.loop == "accelerate" %}
    accelerator: Any = field(default=None, repr=False)
{%- endif %}

    @property
    def has_peers(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree_max(self, value: int) -> int:
        """The largest ``value`` over all ranks (a host-side collective; identity when alone)."""
        return self.agree_max_each([value])[0]

    def agree_max_each(self, values: list[int]) -> list[int]:
        """The largest of each of ``values`` over all ranks, in one host-side collective (identity when alone)."""
        if not self.has_peers:
            return [int(value) for value in values]
        flags = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control)
        return flags.tolist()

{%- if cookiecutter.loop == "plain" %}

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over all ranks, on their device: no host sync (identity when alone)."""
        if self.has_peers:
            dist.all_reduce(values)
        return values
{%- endif %}

    def barrier(self) -> None:
        if self.has_peers:
            dist.barrier(group=self.control)

    def decided_by_main(self, decide: Callable[[], Any]) -> Any:
        """``decide()`` on rank 0, and its result (or the ConfigError it raised) on every rank."""
        if not self.has_peers:
            return decide()
        outcome: list[Any] = [None]
        if self.is_main:
            try:
                outcome = [(decide(), None)]
            except ConfigError as e:
                outcome = [(None, str(e))]
        dist.broadcast_object_list(outcome, src=0, group=self.control)
        value, error = outcome[0]
        if error is not None:
            raise ConfigError(error)
        return value

    def gather_on_main(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0; None on the others."""
        if not self.has_peers:
            return [obj]
        objects: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, objects, dst=0, group=self.control)
        return objects


class AgreedNextStep:
    """The largest of a value over the ranks, agreed one step late so that no rank waits for it: each
    ``exchange(value)`` starts an all-reduce of this step's value on the host-side group and returns the
    one started a step earlier (0 at first), which has had a whole step to arrive. Identity when alone."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.in_flight: tuple[torch.Tensor, Any] | None = None

    def exchange(self, value: int) -> int:
        if not self.process.has_peers:
            return value
        agreed = self.settle()
        flag = torch.tensor([value], dtype=torch.int64)
        self.in_flight = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process.control, async_op=True))
        return agreed

    def settle(self) -> int:
        """The value in flight, once it has arrived (0 when none): every rank calls it where the loop ends."""
        if self.in_flight is None:
            return 0
        (flag, work), self.in_flight = self.in_flight, None
        work.wait()
        return int(flag.item())


def evaluation_agreement(process: Process, stop: StopRequest | None = None) -> Callable[[bool, int], str]:
    """For ``evaluate``, asked before each batch with whether this process has one (and the batch's index): "stop"
    when a stop request (``stop``) abandons the evaluation, "end" when no process has a batch left, "empty" when a
    process had none from the start (a part of an iterable validation set may be), else "go". Under torchrun every
    rank gets the same answer, from one host-side all-reduce a batch."""

    def agreement(has_batch: bool, index: int) -> str:
        reason = stop.reason() if stop is not None else 0
        reason, anyone, someone_without = process.agree_max_each([reason, has_batch, not has_batch])
        if reason:
            return "stop"
        if not anyone:
            return "end"
        return "empty" if index == 0 and someone_without else "go"

    return agreement


def children_with_parameters(model: nn.Module) -> list[nn.Module]:
    """The model's blocks when model.py names none: each child of the model that holds parameters."""
    return [child for child in model.children() if any(True for _ in child.parameters())]
{%- if cookiecutter.loop == "plain" %}


def parallelize(
    build_model: Callable[[Config], nn.Module],
    cfg: Config,
    process: Process,
    precision: Precision,
    units: Callable[[nn.Module], list[nn.Module]],
) -> nn.Module:
    """The model (``build_model(cfg)``) on this process's device. Under torchrun, ``cfg.parallel``: DDP (each rank
    builds the whole model; DDP broadcasts rank 0's weights) or FSDP2 (``shard``). Build the optimizer after
    this: FSDP replaces the parameters with their shards."""
    if not process.has_peers:
        return build_model(cfg).to(process.device)
    if cfg.parallel == "ddp":
        device_ids = [process.device] if process.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(build_model(cfg).to(process.device), device_ids=device_ids)
    return shard(build_model, cfg, process, precision, units)


def shard(
    build_model: Callable[[Config], nn.Module],
    cfg: Config,
    process: Process,
    precision: Precision,
    units: Callable[[nn.Module], list[nn.Module]],
) -> nn.Module:
    """FSDP2: each rank holds 1/world_size of every parameter, gradient and optimizer moment; the submodules
    ``units(model)`` returns are gathered one at a time. No rank but 0 ever holds the whole model.

    Rank 0 builds the model in CPU memory (its weights are a one-process run's with the same seed, whatever the
    other ranks drew from their random streams before); the others build it on the meta device, which takes no
    memory. Each rank shards it on a mesh of the run's device (not torch's default accelerator: a device=cpu run
    on a GPU machine stays on the CPU), a unit at a time; the others then allocate their shards, and rank 0's
    weights are broadcast into every rank's shards a tensor at a time, its buffers (a non-persistent RoPE table,
    which no state dict holds) whole."""
    low = precision.dtype if precision.name != "fp32" else None  # bf16/fp16: computed in it, reduced in fp32
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
    mesh = init_device_mesh(process.device.type, (process.world_size,))
    with contextlib.nullcontext() if process.is_main else torch.device("meta"):
        model = build_model(cfg)
    whole = model.state_dict() if process.is_main else {}  # rank 0's weights, until they are broadcast
    # fully_shard moves a unit to the mesh's device (on a GPU, the current one: set_device in setup) and shards
    # it there at once: the device holds the shards so far plus one whole unit, never the whole model.
    for unit in units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # and the parameters outside the units
    if not process.is_main:
        model.to_empty(device=process.device)  # this rank's shards and buffers, allocated, not yet set
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole, options=options)
    del whole
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module, fsdp_accumulate: str) -> Iterator[None]:
    """For the micro-batches before a step's last: gradients accumulate locally, synced once per step.
    FSDP syncs in every micro-batch unless ``fsdp_accumulate`` is "whole": reduce-scattered, each rank
    holds 1/N of the gradients; accumulated locally, the whole model's."""
    model = getattr(model, "_orig_mod", model)  # inside torch.compile's wrapper
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule) and fsdp_accumulate == "whole":
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:  # one process, or FSDP's sharded accumulation: nothing to hold back
        yield


def setup(cfg: Config) -> Process:
    """Join the process group when launched by torchrun with several processes; pick this process's device."""
    refuse_tasks_without_torchrun()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        device = resolve_device(cfg.device)
        if device.type == "cuda":  # the current GPU is where pinned memory, the bf16 check and new tensors go
            torch.cuda.set_device(device)
        return Process(device=device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if cfg.device.startswith("cuda:"):
        raise ConfigError(
            f"device '{cfg.device}' names one GPU, but under torchrun each process takes cuda:LOCAL_RANK; "
            "use device=cuda or auto (and CUDA_VISIBLE_DEVICES to choose GPUs)"
        )
    if cfg.device == "mps":
        raise ConfigError("device 'mps' has no multi-process backend; run without torchrun")
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                "lower --nproc_per_node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        device = torch.device("cpu")  # device=auto on a Mac: several processes share the CPU
    join_group(device, cfg.dist_timeout_minutes)
    return joined(cfg.dist_timeout_minutes, device)
{%- else %}


def setup(cfg: Config) -> Process:
    """The Accelerator for this config: its device, its processes (accelerate launch or torchrun), its precision."""
    refuse_tasks_without_torchrun()
    if cfg.parallel != "ddp":
        raise ConfigError("parallel=fsdp is not in this project's Accelerate loop, which runs DDP: use parallel=ddp")
    # An accelerate config with FSDP or DeepSpeed would say otherwise; on a CPU, Accelerate would even run DDP
    # in its place without a word (it shards only on GPUs).
    for plugin in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{plugin}", "").lower() == "true":
            raise ConfigError(f"accelerate launch is configured for {plugin}; this loop runs one process or DDP: "
                              "run `accelerate config` again without it, or launch with torchrun")  # fmt: skip
    if cfg.device.startswith("cuda:"):
        raise ConfigError(
            f"device '{cfg.device}': Accelerate gives each process its GPU; use device=cuda (or auto) "
            "and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    device = resolve_device(cfg.device)  # one that exists here, as the plain loop checks it
    precision = resolve_precision(cfg.precision, device)
    if cfg.precision == "fp16" and precision.name == "fp32":
        log.warning("precision fp16: Accelerate has no fp16 autocast on the CPU; training in fp32")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun, or accelerate launch (which runs it): a group
        # Accelerate joins rather than starts, on the GPU it will give this process (cuda:LOCAL_RANK)
        local = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if device.type == "cuda" else device
        join_group(local, cfg.dist_timeout_minutes)
    try:
        accelerator = Accelerator(
            cpu=device.type == "cpu",  # also what makes torchrun's CPU processes one group (gloo)
            mixed_precision={"fp32": "no"}.get(precision.name, precision.name),
        )
    except ValueError as e:  # Accelerate sets its state once per process: another precision in a second run here
        raise ConfigError(f"Accelerate: {e}") from None
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise ConfigError(
            f"Accelerate is configured for {accelerator.distributed_type.value}; this loop runs one process or "
            "DDP: run `accelerate config` again without FSDP or DeepSpeed"
        )
    process = joined(cfg.dist_timeout_minutes, accelerator.device)  # the group Accelerate joined, for the agreement
    process.accelerator = accelerator
    return process
{%- endif %}


def refuse_tasks_without_torchrun() -> None:
    """``srun --ntasks=8 python -m ...train`` starts 8 runs that know nothing of each other (only torchrun sets
    WORLD_SIZE and RANK), each training alone into the same out_dir: refused, with the way that works."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or 1)  # set by srun in each task of a job step
    if tasks > 1 and "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            f"srun started {tasks} tasks of this command without torchrun, so each would train alone into the same "
            "out_dir: run one task per node that starts torchrun, srun --ntasks-per-node=1 torchrun "
            "--nproc_per_node=GPUS -m {{ cookiecutter.package_name }}.train ... (docs/resume.md)"
        )


def join_group(device: torch.device, timeout_minutes: float) -> None:
    """Join torchrun's processes: NCCL for GPUs, gloo for CPUs. torchrun --max-restarts starts every process
    again when one dies, and its store still holds the previous attempt's addresses: each attempt gets a
    store of its own, so a restarted group joins afresh instead of dialling dead processes."""
    timeout = timedelta(minutes=timeout_minutes)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world_size, timeout=timeout,
                            device_id=device if device.index is not None else None)  # fmt: skip


SAVE_TIMEOUT = timedelta(minutes=60)  # a background save's collectives: as long as a big model's write may take


def joined(timeout_minutes: float, device: torch.device) -> Process:
    """This process's place in the process group (started by ``setup``, or by a library), plus a gloo group
    for host-side agreement when the group's backend is not gloo (NCCL)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Process(device=device)
    timeout = timedelta(minutes=timeout_minutes)
    control = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
    saves = dist.new_group(backend="gloo", timeout=max(timeout, SAVE_TIMEOUT))
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    return Process(rank, local_rank, dist.get_world_size(), device, control, saves)


def cleanup(process: Process, wait_for_others: bool = True) -> None:
    if process.has_peers and dist.is_initialized():
        if wait_for_others:  # leave together: gloo can abort at exit when a peer is already gone
            dist.barrier(group=process.control)
        # torch's state-dict helpers leave the model in a reference cycle; collected here, its DDP reducer
        # lets go of the group now, not while the interpreter shuts down (where gloo can abort the process).
        gc.collect()
{%- if cookiecutter.loop == "plain" %}
        dist.destroy_process_group()
{%- else %}
        process.accelerator.end_training()  # Accelerate's end: its trackers (none here), then the process group
{%- endif %}
