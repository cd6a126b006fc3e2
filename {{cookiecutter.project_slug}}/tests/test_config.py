"""Essential 1: the config loads, overrides, validates, round-trips, and rejects bad input clearly."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from {{ cookiecutter.package_name }}.essentials.config import Config, ConfigError, config_from_dict, load_config, to_dict
from {{ cookiecutter.package_name }}.evaluate import evaluate_checkpoint
from {{ cookiecutter.package_name }}.train import main, train

from . import stand_in
from .conftest import ROOT, checkpoint, cli


def test_defaults_yaml_and_overrides_are_applied_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nbatch_size: 16\nmax_steps: 500\n")  # 1e-3: a float (YAML 1.2), not a string (1.1)
    cfg = load_config(path, ["batch_size=8", "overwrite=true", "clip_grad_norm=0"])
    assert cfg.lr == 1e-3 and cfg.batch_size == 8 and cfg.max_steps == 500 and cfg.overwrite is True
    assert cfg.clip_grad_norm == 0.0 and isinstance(cfg.clip_grad_norm, float)
    assert cfg.weight_decay == Config().weight_decay


def test_values_are_read_by_yamls_rules_and_checked_against_the_fields_type():
    cfg = load_config(
        None,
        ["lr=3e-4", "max_time_minutes=90", "overwrite=yes", "out_dir=2024", "resume=", "tracker_project=on", "seed=7"],
    )
    assert cfg.lr == 3e-4 and cfg.max_time_minutes == 90.0 and isinstance(cfg.max_time_minutes, float)
    assert cfg.overwrite is True and cfg.seed == 7
    assert cfg.out_dir == "2024" and cfg.resume == "" and cfg.tracker_project == "on"  # strings, as written


def test_the_task_settings_are_one_group_in_yaml_command_line_and_checkpoint(tmp_path):
    # The tests' TaskConfig (stand_in.py) in place of task.py's: its setting as YAML, as task.<name>=value,
    # checked by its check_task_config, and handed to metric_totals and compute_metrics.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.5, "task": {"vocab": 20}}))
    cfg = load_config(path)
    assert cfg.task == stand_in.TaskConfig(vocab=20) and cfg.lr == 0.5
    assert load_config(path, ["task.vocab=24"]).task.vocab == 24
    assert to_dict(cfg)["task"] == {"vocab": 20} and config_from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="task.vocab must be >= 16, got 3"):
        load_config(path, ["task.vocab=3"])


def test_config_round_trips_through_yaml_dict_and_checkpoint(make_config):
    cfg = make_config("max_steps=4", "warmup_steps=0", "eval_every=2", "lr=0.02")
    train(cfg)
    written = yaml.safe_load((Path(cfg.out_dir) / "config.yaml").read_text())
    assert written == to_dict(cfg)
    assert config_from_dict(written) == cfg
    for name in ("best.pt", "last.pt"):
        assert checkpoint(cfg.out_dir, name)["config"] == to_dict(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lrr=0.1"], "unknown config key 'lrr' (did you mean 'lr'?)"),
        (["batch_size=eight"], "batch_size must be an integer, got 'eight'"),
        (["lr=fast"], "lr must be a number"),
        (["overwrite=maybe"], "overwrite must be true or false"),
        (["lr=0"], "lr must be > 0"),
        (["lr=-1"], "lr must be > 0"),
        (["accum_steps=0"], "accum_steps must be >= 1"),
        (["warmup_steps=500", "max_steps=100"], "warmup_steps must be between 0 and max_steps (100)"),
        (["precision=fp8"], "precision must be one of auto, bf16, fp16, fp32"),
        (["lr_schedule=linear"], "lr_schedule must be one of warmup_cosine, onecycle, step"),
        (["optimizer=adam"], "optimizer must be one of adamw, sgd"),
        (["tracker=neptune"], "tracker must be one of none, wandb, mlflow"),
        (["lr_multipliers=head"], "lr_multipliers must be name_prefix=factor pairs with factors > 0"),
        (["beta2=1"], "beta2 must be in [0, 1), got 1.0"),
        (["max_time_minutes=-5"], "max_time_minutes must be >= 0"),
        (["device=tpu"], "device must be auto, cpu, cuda, cuda:N or mps"),
        (["max_steps"], "override 'max_steps' is not key=value"),
        (["monitor=val_acc_typo"], "monitor 'val_acc_typo' is not a metric of task.py; choose one of ['val_acc', 'val"),
        (["debug=1"], "debug must be true or false, got 1"),
        (["max_steps=true"], "max_steps must be an integer, got True"),
        (["max_steps=1e3"], "max_steps must be an integer, got 1000.0"),
        (["lr=[1,"], "override 'lr=[1,': the value is not valid YAML"),
        (["monitor_mode=min"], "unknown config key 'monitor_mode'"),  # METRIC_GOALS in task.py decides
        (["task.no_such_setting=1"], "unknown config key 'task.no_such_setting'"),
        (["task=small"], "task must be a mapping of the task's settings (name: value), got 'small'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, overrides, message):
    out_dir = tmp_path / "out"
    code = main(cli(out_dir, *overrides))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out_dir.exists()


def test_missing_and_malformed_yaml(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1,\n")
    assert main(["--config", str(bad)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    listing = tmp_path / "list.yaml"
    listing.write_text("- lr\n")
    assert main(["--config", str(listing)]) == 2
    assert "must hold a mapping" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_unavailable_device_is_rejected_before_anything_is_built(tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert main(cli(out_dir, "device=cuda")) == 2
    assert "is not available" in capsys.readouterr().err
    assert not out_dir.exists()


def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "stand_in_cli.py"), "train", "batchsize=8", f"out_dir={tmp_path}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # the script imports the package from here
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == "error: unknown config key 'batchsize' (did you mean 'batch_size'?)\n"


def test_a_checkpoint_config_with_keys_the_code_lacks_still_evaluates(make_config, caplog):
    # A field removed from Config since the checkpoint was saved: named, ignored, and the model still loads.
    cfg = make_config("max_steps=3", "warmup_steps=0")
    train(cfg)
    path = Path(cfg.out_dir) / "best.pt"
    state = checkpoint(cfg.out_dir, "best.pt")
    state["config"]["colour"] = "red"
    state["config"]["task"]["setting_removed_since"] = 4  # and a task setting
    torch.save(state, path)
    with caplog.at_level("WARNING"):
        metrics = evaluate_checkpoint(path)
    assert f"{path}: config key(s) task.setting_removed_since, colour are not in Config any more" in caplog.text
    assert metrics["val_loss"] == state["metrics"]["val_loss"]
    with pytest.raises(ConfigError, match="lr must be > 0"):  # the known keys are still validated
        config_from_dict({**to_dict(Config()), "lr": 0.0})


INTEGER_FIELDS = [field.name for field in dataclasses.fields(Config) if field.type in (int, "int")]


@pytest.mark.parametrize("name", INTEGER_FIELDS)
def test_every_integer_field_refuses_a_bool(name):
    with pytest.raises(ConfigError, match=f"^{name} must be an integer, got True$"):
        load_config(None, [f"{name}=true"])


def test_a_common_name_for_a_setting_suggests_this_configs_name(capsys):
    for given, ours in (("learning_rate", "lr"), ("epochs", "max_steps"), ("grad_clip", "clip_grad_norm")):
        with pytest.raises(ConfigError, match=f"^unknown config key '{given}' \\(did you mean '{ours}'\\?\\)"):
            load_config(None, [f"{given}=1"])
