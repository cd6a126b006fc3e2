"""Essential 1: the config. Every hyperparameter lives here, with a default.

Loaded from YAML, overridden on the command line as ``key=value``, validated
before anything is built, written to ``out_dir/config.yaml`` and stored as a
plain dict in every checkpoint. The task's own settings are one group, ``task:``
(``TaskConfig`` in task.py): ``task.num_classes=8`` on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..task import TaskConfig, check_task_config

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LR_SCHEDULES = ("warmup_cosine", "onecycle", "step", "wsd")
PARALLEL = ("ddp", "fsdp")
FSDP_ACCUMULATE = ("sharded", "whole")
OPTIMIZERS = ("adamw", "sgd", "muon")
TRACKERS = ("none", "wandb", "mlflow")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config problem the user can fix; reported as one line, exit code 2."""


@dataclass
class Config:
    # --- run ---
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: str = "{{ cookiecutter.precision }}"  # auto, bf16, fp16, fp32
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default
    compile: bool = False  # torch.compile the model (checkpoints keep the plain weights)
    # Each of model.py's blocks keeps only its input in the forward and computes its activations again in the
    # backward: less memory for about one more forward of compute; the same numbers.
    activation_checkpointing: bool = False
    tf32: bool = True  # TF32 matmuls on GPUs that have them (Ampere+): fp32 speed x several, 10-bit mantissa
    resume: str = ""  # "" starts fresh, "auto" continues from out_dir/last.pt if present, or a path
    init_from: str = ""  # a fresh start from a checkpoint's weights only (new optimizer, schedule, step): fine-tuning
    overwrite: bool = False  # allow a fresh start in an out_dir that already holds a run
    max_time_minutes: float = 0.0  # save last.pt and exit 124 once this much wall-clock time has passed; 0: no limit
    debug: bool = False  # a few steps, one evaluation, one save, in out_dir + "-debug": every code path in seconds

    # --- the task: data, model, loss and metrics (TaskConfig in task.py; yours to replace) ---
    task: TaskConfig = field(default_factory=lambda: TaskConfig())  # looked up when made: the tests swap the task
    num_workers: int = 0  # DataLoader worker processes per training process

    # --- optimisation ---
    # adamw; sgd (with momentum: classic vision models); muon: torch's Muon for the hidden weight matrices, AdamW
    # (beta1, beta2, eps) for the rest, at the same lr and weight_decay (optimizer.py)
    optimizer: str = "adamw"
    lr: float = 3e-3
    lr_multipliers: str = ""  # per-group lr, e.g. "backbone.=0.1,head.=2": parameters named so get lr x factor
    weight_decay: float = 0.01  # on weight matrices and embeddings only, never biases or norm gains
    beta1: float = 0.9  # adamw
    beta2: float = 0.999  # adamw
    eps: float = 1e-8  # adamw
    momentum: float = 0.9  # sgd
    muon_momentum: float = 0.95  # muon
    batch_size: int = 32  # micro-batch; one optimizer step sees batch_size * accum_steps samples
    accum_steps: int = 1
    max_steps: int = 2000  # optimizer steps
    clip_grad_norm: float = 1.0  # 0 turns clipping off
    ema_decay: float = 0.0  # weight EMA (ema.py), which evaluation, best.pt and export use, e.g. 0.999; 0: off
    ema_start: int = 0  # weight EMA: the average follows the weights for this many steps, then averages

    # --- learning-rate schedule (schedule.py) ---
    lr_schedule: str = "{{ cookiecutter.lr_schedule }}"  # warmup_cosine, onecycle, step, wsd
    warmup_steps: int = 100
    min_lr: float = 3e-5
    lr_step_size: int = 500  # step schedule: decay every this many steps
    lr_gamma: float = 0.1  # step schedule: multiply the lr by this at each decay
    decay_steps: int = 0  # warmup_cosine, onecycle, wsd: the step where lr reaches min_lr; 0: max_steps
    cooldown_steps: int = 0  # wsd: the linear cooldown to min_lr, over the last this many steps (0 otherwise)

    # --- validation, logging, checkpoints ---
    eval_every: int = 200
    max_eval_batches: int = 0  # evaluate on at most this many batches per process, the same ones each time; 0: all
    log_every: int = 50
    peak_flops: float = 0.0  # your device's peak FLOP/s in the precision trained in (docs/gpus.md), for mfu; 0: no mfu
    ckpt_every: int = 200
    keep_every: int = 0  # a snapshot of the weights every this many steps, out_dir/snapshots, kept (0: none)
    async_save: bool = True  # last.pt written in the background: the step waits only while the state is copied
    monitor: str = "val_loss"  # the metric that decides best.pt, in the direction METRIC_GOALS (task.py) gives
    max_bad_steps: int = 5  # stop after this many consecutive non-finite steps
    patience: int = 0  # early stopping: stop after this many evaluations without a new best monitor; 0: never
    profile_steps: str = ""  # "A-B": a torch.profiler trace of optimizer steps A to B in out_dir/profile (profiler.py)
    progress: bool = True  # a progress bar when stdout is a terminal (plain log lines otherwise)
    tensorboard: bool = False  # also write scalars to out_dir/tensorboard (pip install -e '.[tensorboard]')
    tracker: str = "none"  # none, wandb or mlflow: also log to that experiment tracker (trackers.py)
    tracker_project: str = "{{ cookiecutter.project_slug }}"  # the W&B project or MLflow experiment

    # --- several processes (torchrun) ---
    parallel: str = "ddp"  # ddp: each process holds the whole model; fsdp: each holds 1/N of it (FSDP2)
    # fsdp with accum_steps > 1: "sharded" reduce-scatters every micro-batch's gradients, so each process holds
    # 1/N of them; "whole" keeps them whole until the step's last micro-batch: one reduce-scatter per step, but
    # the whole model's gradients on every process.
    fsdp_accumulate: str = "sharded"
    dist_timeout_minutes: float = 10.0  # a collective waiting longer (a rank died or hangs) fails the run


def _type_name(kind: Any) -> str:
    """'int' for ``int`` too: a dataclass in a module without ``from __future__ import annotations``."""
    return kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))


def field_types() -> dict[str, str]:
    """Every key, as written on the command line (task settings as task.<name>), and its type's name."""
    types = {f.name: _type_name(f.type) for f in fields(Config) if f.name != "task"}
    return types | {f"task.{f.name}": _type_name(f.type) for f in fields(TaskConfig)}


# Other loops' names for some settings, which no spelling check finds: learning_rate is far from lr.
KNOWN_AS = {
    "learning_rate": "lr",
    "epochs": "max_steps",
    "num_steps": "max_steps",
    "grad_clip": "clip_grad_norm",
    "max_grad_norm": "clip_grad_norm",
    "gradient_accumulation_steps": "accum_steps",
    "warmup": "warmup_steps",
    "mixed_precision": "precision",
}


def _suggest(name: str) -> str:
    close = [KNOWN_AS[name]] if name in KNOWN_AS else difflib.get_close_matches(name, field_types(), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class YamlLoader(yaml.SafeLoader):
    """YAML as PyYAML reads it, plus YAML 1.2's numbers with an exponent: 1e-3 is a float, not a string."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)
TYPES = {"bool": bool, "int": int, "float": float, "str": str}
_TYPE_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


def typed(key: str, value: Any) -> Any:
    """``value``, as YAML read it, checked against the type of field ``key`` (an int is a float where one goes)."""
    kind = field_types()[key]
    if kind == "float" and type(value) is int:
        return float(value)
    if kind == "str" and value is None:  # an empty value: `resume:` in a file
        return ""
    if kind == "str" and type(value) in (int, float):  # out_dir: 2024
        return str(value)
    if kind in TYPES and type(value) is not TYPES[kind]:  # bool is no int here, nor 1 a bool
        raise ConfigError(f"{key} must be {_TYPE_WORDS[kind]}, got {value!r}")
    return value  # a TaskConfig field of another type (list[int], say) takes what YAML read


def flatten(values: dict[str, Any]) -> dict[str, Any]:
    """``{"task": {"num_classes": 4}}`` (YAML, checkpoints) as ``{"task.num_classes": 4}`` (command line)."""
    flat = {}
    for key, value in values.items():
        if key == "task":
            if not isinstance(value, dict):
                raise ConfigError(f"task must be a mapping of the task's settings (name: value), got {value!r}")
            flat.update({f"task.{name}": item for name, item in value.items()})
        else:
            flat[key] = value
    return flat


def apply_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    for key, raw in flatten(values).items():
        if key not in field_types():
            raise ConfigError(f"unknown config key '{key}'{_suggest(key)}")
        group, _, name = key.rpartition(".")
        setattr(cfg.task if group else cfg, name, typed(key, raw))
    return cfg


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``key=value`` arguments: each value read by YAML's rules (a string field's value as written)."""
    values, types = {}, field_types()
    for arg in args:
        key, sep, text = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{arg}' is not key=value (e.g. lr=1e-3)")
        try:
            values[key] = text.strip() if types.get(key) == "str" else yaml.load(text, Loader=YamlLoader)
        except yaml.YAMLError:
            raise ConfigError(f"override '{arg}': the value is not valid YAML") from None
    return values


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, not {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated."""
    cfg = Config()
    if path is not None:
        apply_overrides(cfg, read_yaml(path))
    apply_overrides(cfg, parse_overrides(overrides or []))
    if cfg.debug:
        cfg = debug_run(cfg)
    validate(cfg)
    return cfg


DEBUG_STEPS = 4
DEBUG_EVAL_BATCHES = 4


def debug_run(cfg: Config) -> Config:
    """debug=true: the same run cut to a few steps, each logged, with one evaluation of a few batches and one
    save at the end, written to out_dir + "-debug" (replaced each time): every code path of the run in seconds,
    your data, model and settings included, before a long run."""
    steps = min(cfg.max_steps, DEBUG_STEPS)
    every = {"log_every": 1, "eval_every": steps, "ckpt_every": steps, "patience": 0}
    start = {"resume": "", "overwrite": True, "out_dir": f"{cfg.out_dir.rstrip('/')}-debug"}
    eval_batches = min(cfg.max_eval_batches or DEBUG_EVAL_BATCHES, DEBUG_EVAL_BATCHES)
    steps_and_schedule = {"max_steps": steps, "warmup_steps": min(cfg.warmup_steps, steps), "decay_steps": 0}
    return dataclasses.replace(cfg, **steps_and_schedule, **every, **start, max_eval_batches=eval_batches)


def config_from_dict(values: dict[str, Any], source: str = "the checkpoint") -> Config:
    """Rebuild a Config saved in a checkpoint, validated.

    Keys that ``Config`` no longer has (removed since the checkpoint was saved) are named in a
    warning and ignored, so that an older checkpoint still evaluates when its model loads.
    """
    values, types = flatten(values), field_types()
    unknown = [key for key in values if key not in types]
    if unknown:
        log.warning("%s: config key(s) %s are not in Config any more; ignored", source, ", ".join(unknown))
    cfg = apply_overrides(Config(), {key: value for key, value in values.items() if key in types})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    require(cfg.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got '{cfg.precision}'")
    require(
        cfg.lr_schedule in LR_SCHEDULES,
        f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got '{cfg.lr_schedule}'",
    )
    require(
        DEVICE_PATTERN.fullmatch(cfg.device) is not None,
        f"device must be auto, cpu, cuda, cuda:N or mps, got '{cfg.device}'",
    )
    require(cfg.parallel in PARALLEL, f"parallel must be one of {', '.join(PARALLEL)}, got '{cfg.parallel}'")
    require(
        cfg.fsdp_accumulate in FSDP_ACCUMULATE,
        f"fsdp_accumulate must be one of {', '.join(FSDP_ACCUMULATE)}, got '{cfg.fsdp_accumulate}'",
    )
    require(bool(cfg.out_dir), "out_dir must not be empty")
    require(cfg.tracker in TRACKERS, f"tracker must be one of {', '.join(TRACKERS)}, got '{cfg.tracker}'")
    require(cfg.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{cfg.optimizer}'")
    require(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    lr_multipliers(cfg.lr_multipliers)  # raises ConfigError when malformed
    for key in ("beta1", "beta2", "momentum", "muon_momentum"):
        require(0 <= getattr(cfg, key) < 1, f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    require(0 <= cfg.ema_decay < 1, f"ema_decay must be in [0, 1) (0: no weight EMA), got {cfg.ema_decay}")
    require(cfg.eps > 0, f"eps must be > 0, got {cfg.eps}")
    require(0 <= cfg.min_lr <= cfg.lr, f"min_lr must be between 0 and lr ({cfg.lr}), got {cfg.min_lr}")
    require(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    require(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    require(cfg.accum_steps >= 1, f"accum_steps must be >= 1, got {cfg.accum_steps}")
    require(cfg.max_steps >= 1, f"max_steps must be >= 1, got {cfg.max_steps}")
    require(
        0 <= cfg.warmup_steps <= cfg.max_steps,
        f"warmup_steps must be between 0 and max_steps ({cfg.max_steps}), got {cfg.warmup_steps}",
    )
    require(cfg.clip_grad_norm >= 0, f"clip_grad_norm must be >= 0 (0 turns clipping off), got {cfg.clip_grad_norm}")
    require(cfg.lr_step_size >= 1, f"lr_step_size must be >= 1, got {cfg.lr_step_size}")
    require(
        cfg.decay_steps == 0 or cfg.decay_steps >= cfg.warmup_steps,
        f"decay_steps must be 0 (= max_steps) or at least warmup_steps ({cfg.warmup_steps}), got {cfg.decay_steps}",
    )
    require(0 < cfg.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {cfg.lr_gamma}")
    if cfg.lr_schedule == "wsd":
        horizon = cfg.decay_steps or cfg.max_steps
        require(
            1 <= cfg.cooldown_steps <= horizon - cfg.warmup_steps,
            f"lr_schedule wsd needs cooldown_steps between 1 and {horizon - cfg.warmup_steps} (the steps after "
            f"warmup), got {cfg.cooldown_steps}",
        )
    else:
        require(cfg.cooldown_steps == 0, f"cooldown_steps is wsd's; lr_schedule {cfg.lr_schedule} takes 0")
    for key in ("eval_every", "log_every", "ckpt_every", "max_bad_steps"):
        require(getattr(cfg, key) >= 1, f"{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("num_workers", "num_threads", "patience", "max_eval_batches", "peak_flops", "keep_every", "ema_start"):
        require(getattr(cfg, key) >= 0, f"{key} must be >= 0, got {getattr(cfg, key)}")
    require(cfg.dist_timeout_minutes > 0, f"dist_timeout_minutes must be > 0, got {cfg.dist_timeout_minutes}")
    require(cfg.max_time_minutes >= 0, f"max_time_minutes must be >= 0 (0: no limit), got {cfg.max_time_minutes}")
    window = profile_window(cfg.profile_steps)
    require(
        window is None or window[1] <= cfg.max_steps,
        f"profile_steps {cfg.profile_steps} ends after max_steps ({cfg.max_steps})",
    )
    for problem in check_task_config(cfg.task):
        raise ConfigError(problem)


def lr_multipliers(text: str) -> list[tuple[str, float]]:
    """``"backbone.=0.1,head.=2"`` as ``[("backbone.", 0.1), ("head.", 2.0)]``: parameter-name prefixes and the
    factor their lr is multiplied by (the first prefix that matches a name counts)."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        prefix, sep, factor = item.partition("=")
        try:
            value = float(factor) if sep and prefix else -1.0
        except ValueError:
            value = -1.0
        if value <= 0:
            raise ConfigError(
                f'lr_multipliers must be name_prefix=factor pairs with factors > 0 (e.g. "backbone.=0.1,head.=2"), '
                f"got '{item}'"
            )
        pairs.append((prefix.strip(), value))
    return pairs


def profile_window(text: str) -> tuple[int, int] | None:
    """``"A-B"`` (profile_steps) as ``(A, B)``, the first and last optimizer step profiled; ``""`` as None."""
    if not text:
        return None
    first, sep, last = text.partition("-")
    if not (sep and first.strip().isdigit() and last.strip().isdigit() and 1 <= int(first) <= int(last)):
        raise ConfigError(f"profile_steps must be A-B, the first and last optimizer step (1 <= A <= B), got '{text}'")
    return int(first), int(last)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ between two config dicts: {key: (old, new)}, task settings as task.<name>."""
    old, new = flatten(old), flatten(new)
    keys = list(dict.fromkeys([*old, *new]))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
