"""What a person sees: progress bar or plain lines, start and end blocks, plots, TensorBoard, evaluate."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from {{ cookiecutter.package_name }} import export as export_module
from {{ cookiecutter.package_name }} import plot as plot_module
from {{ cookiecutter.package_name }} import train as train_module
from {{ cookiecutter.package_name }}.essentials import validation as validation_module
from {{ cookiecutter.package_name }}.essentials.checkpoint import save_checkpoint
from {{ cookiecutter.package_name }}.essentials.config import DEBUG_EVAL_BATCHES, ConfigError, to_dict
from {{ cookiecutter.package_name }}.export import main as export_main
from {{ cookiecutter.package_name }}.machinery import progress as progress_module
from {{ cookiecutter.package_name }}.machinery.metrics import read_metrics
from {{ cookiecutter.package_name }}.machinery.progress import Progress
from {{ cookiecutter.package_name }}.machinery.speed import Speed
from {{ cookiecutter.package_name }}.train import main, train

from . import stand_in
{%- if cookiecutter.loop == "plain" %}
from .conftest import ROOT, checkpoint, cli, sharded_weights
{%- else %}
from .conftest import ROOT, checkpoint, cli
{%- endif %}
from .faults import SignalOnCall

SCRIPT_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # tests/stand_in_cli.py imports the package from here
RUN = ["device=cpu", "max_steps=40", "warmup_steps=5", "log_every=10", "eval_every=20"]


def run_cli(out_dir: Path, *overrides: str, terminal: bool = False, columns: int = 120) -> str:
    """Train in a subprocess whose stdout is a pipe, or a pseudo-terminal ``columns`` wide; return what it printed."""
    command = [sys.executable, str(ROOT / "tests" / "stand_in_cli.py"), "train", f"out_dir={out_dir}", *RUN, *overrides]
    if not terminal:
        result = subprocess.run(command, cwd=ROOT, env=SCRIPT_ENV, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout
    controller, terminal_fd = pty.openpty()
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    process = subprocess.Popen(
        command, cwd=ROOT, env=SCRIPT_ENV, stdout=terminal_fd, stderr=terminal_fd, close_fds=True
    )
    os.close(terminal_fd)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert process.wait(timeout=120) == 0
    return b"".join(chunks).decode(errors="replace")


PLAIN_LINE = re.compile(
    r"^step 10/40  loss \d+\.\d+  lr \S+  grad_norm \S+  [\d,]+ samples/s  [\d,]+ tokens/s  peak [\d,]+ MB  "
    r"elapsed \d:\d\d:\d\d  left ~\d:\d\d:\d\d$",
    re.MULTILINE,
)


def test_piped_output_has_plain_lines_and_no_bar(tmp_path):
    out = run_cli(tmp_path / "run")
    assert PLAIN_LINE.search(out), out
    assert "\r" not in out and "█" not in out
    # The start block, an evaluation with its best marker, and the end summary.
    expected = [
        "config:     ",
        "device:     cpu x 1 process(es), precision",
        "threads:    1 (num_threads=1) CPU threads per process",
        "model:      2,096 parameters",
        "batch:      32 samples per optimizer step = 32 x 1 accum x 1 process(es)",
        "data:       1,024 training samples, 32 batches per process an epoch",
        "eval step 20  val_loss",
        "(new best)",
        "done: 40 steps in",
        "best val_loss",
        "files: ",
    ]
    for line in expected:
        assert line in out, line
    assert "max_steps=40" in out.split("config:", 1)[1].splitlines()[0]  # differences from the defaults
    assert f"{tmp_path / 'run' / 'best.pt'}" in out and f"{tmp_path / 'run' / 'metrics.jsonl'}" in out


def test_a_terminal_gets_one_progress_bar(tmp_path):
    out = run_cli(tmp_path / "run", terminal=True)
    assert "40/40" in out and "samples/s" in out and "\r" in out  # tqdm redraws in place
    assert re.search(r"[\d,]+ tokens/s  peak [\d,]+ MB", out), out  # the speed figures (speed.py)
    assert not PLAIN_LINE.search(out.replace("\r", "\n"))
    assert "eval step 20" in out and "done: 40 steps" in out  # log lines still show, above the bar


def test_progress_false_keeps_plain_lines_in_a_terminal(tmp_path):
    out = run_cli(tmp_path / "run", "progress=false", terminal=True)
    assert PLAIN_LINE.search(out.replace("\r\n", "\n")) and "█" not in out


def test_a_terminal_too_narrow_for_a_bar_gets_plain_lines(tmp_path):
    out = run_cli(tmp_path / "run", terminal=True, columns=0)  # what some CI consoles and emacs shells report
    assert PLAIN_LINE.search(out.replace("\r\n", "\n")) and "█" not in out


def test_the_bar_ends_at_the_step_the_run_stopped(make_config, monkeypatch):
    monkeypatch.setattr(progress_module, "terminal_columns", lambda: 120)
    cfg = make_config("max_steps=100")
    bar = Progress(cfg, 0, 32, is_main=True, speed=Speed(cfg, torch.device("cpu"), None, None, None))
    assert bar.show_bar
    bar.update(50, {"step": 50, "loss": 0.5, "lr": 1e-3, "grad_norm": 1.0}, 300.0, 0.0)
    bar.close(57, 0.0)  # a signal stopped the run between log steps
    assert bar.bar.n == 57


def test_throughput_leaves_out_the_start_up(make_config, monkeypatch, caplog):
    # The clock the progress reads is a fake one, whatever the machine's load: 10 ms a step, and 10 s more
    # in the first step, which also starts things up. Counted, it would cut the first samples/s a hundredfold.
    real_loss, steps = train_module.compute_loss, {"n": 0}

    def counted(output, target):
        steps["n"] += 1
        return real_loss(output, target)

    monkeypatch.setattr(train_module, "compute_loss", counted)
    clock = SimpleNamespace(perf_counter=lambda: 0.01 * steps["n"] + (10.0 if steps["n"] else 0.0))
    monkeypatch.setattr(progress_module, "time", clock)
    monkeypatch.setattr(train_module, "time", clock)  # and the seconds spent evaluating and saving, left out
    monkeypatch.setattr(progress_module, "terminal_columns", lambda: 0)  # plain lines, into caplog
    with caplog.at_level("INFO"):
        summary = train(make_config("max_steps=30", "warmup_steps=0", "log_every=10", "eval_every=100",
                                    "ckpt_every=100"))  # fmt: skip
    rates = [float(line.split(" samples/s")[0].rsplit(" ", 1)[1].replace(",", ""))
             for line in caplog.messages if line.startswith("step ")]  # fmt: skip
    rates.append(summary["samples_per_second"])
    print(f"samples/s per log window, then the summary's: {rates} (32 samples in 10 ms: 3,200)")
    assert rates == pytest.approx([3200, 3200, 3200, 3200], rel=0.001)


def test_plot_writes_a_real_image(make_config):
    pytest.importorskip("matplotlib", reason="needs the plot extra: pip install -e '.[plot]'")
    from matplotlib import image

    cfg = make_config("max_steps=60", "warmup_steps=5", "log_every=5", "eval_every=15")
    train(cfg)
    assert plot_module.main([cfg.out_dir]) == 0
    png = Path(cfg.out_dir) / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(png)
    height, width = pixels.shape[:2]
    assert height >= 600 and width >= 600
    ink = (pixels[..., :3].mean(axis=-1) < 0.9).mean()  # share of pixels that are not (near) white
    assert 0.02 < ink < 0.5, ink


def test_plot_has_a_panel_for_each_metric_whatever_its_name(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="needs the plot extra: pip install -e '.[plot]'")
    records = [{"step": s, "lr": 0.1, "loss": 1.0 / s, "skipped": 0} for s in range(10, 101, 10)]
    records += [{"step": 50, "val_mae": 0.4, "val_r2": 0.5}, {"step": 100, "val_mae": 0.3, "val_r2": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "config.yaml").write_text("monitor: val_mae\n")
    monkeypatch.setitem(plot_module.METRIC_GOALS, "val_mae", "min")  # as a task.py that measures it declares
    train, evals, names = plot_module.split_records(records)
    assert names == ["val_mae", "val_r2"] and len(train) == 10 and len(evals) == 2
    assert plot_module.best_step(evals, tmp_path) == ("val_mae", 100)
    assert plot_module.main([str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_smoothed_loss_does_not_lag():
    steps = list(range(0, 1001, 50))
    smoothed = plot_module.centred_mean(steps, [float(s) for s in steps], half_window=100)
    assert smoothed[10] == 500.0  # a straight line stays where it is, unlike a moving average behind it


def test_plot_without_matplotlib_says_how_to_install(make_config, monkeypatch, capsys):
    cfg = make_config("max_steps=5", "warmup_steps=0")
    train(cfg)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert plot_module.main([cfg.out_dir]) == 2
    err = capsys.readouterr().err
    assert err == "error: plotting needs matplotlib: pip install -e '.[plot]'\n"
    assert not (Path(cfg.out_dir) / "curves.png").exists()


def test_plot_of_a_folder_without_a_run(tmp_path, capsys):
    assert plot_module.main([str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_tensorboard_scalars(make_config):
    pytest.importorskip("tensorboard", reason="needs the tensorboard extra: pip install -e '.[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config("tensorboard=true", "max_steps=20", "warmup_steps=0", "log_every=5", "eval_every=10",
                      "precision=fp32")  # fp32: no skipped step, a loss at every log step  # fmt: skip
    train(cfg)
    events = EventAccumulator(str(Path(cfg.out_dir) / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "val/loss", "val/acc"} <= tags  # two sections
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]
    assert [e.step for e in events.Scalars("val/loss")] == [10, 20]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_gets_the_numbers_and_a_resumed_run_continues_its_tracker_run(make_config, monkeypatch, tracker):
    module = pytest.importorskip(tracker, reason=f"needs the {tracker} extra: pip install -e '.[{tracker}]'")
    cfg = make_config()
    # Offline: W&B writes its runs under out_dir/wandb; MLflow into a local file store.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{cfg.out_dir}-mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    logged, started = [], []
    if tracker == "wandb":  # what reaches the real W&B run object (its offline files are a binary log)
        real_init = module.init

        def recording_init(**kwargs):
            started.append(kwargs.get("id"))
            run = real_init(**kwargs)
            real_log = run.log
            run.log = lambda values, step: (logged.append((step, values)), real_log(values, step=step))
            return run

        monkeypatch.setattr(module, "init", recording_init)
    run = ["tracker=" + tracker, "max_steps=20", "warmup_steps=0", "log_every=5", "eval_every=10", "ckpt_every=10"]
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "compute_loss", SignalOnCall(train_module.compute_loss, 13))  # in step 13
        assert main(cli(cfg.out_dir, *run, "precision=fp32")) == 143
    run_id = checkpoint(cfg.out_dir)["tracker_run_id"]
    assert run_id and main(cli(cfg.out_dir, *run, "precision=fp32", "resume=auto")) == 0
    assert checkpoint(cfg.out_dir)["tracker_run_id"] == run_id  # one tracker run, continued
    if tracker == "mlflow":
        from mlflow.tracking import MlflowClient

        history = {key: [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]
                   for key in ("train/loss", "val/loss", "val/acc")}  # fmt: skip
    else:
        assert started == [None, run_id] and list((Path(cfg.out_dir) / "wandb").glob(f"offline-run-*-{run_id}"))
        history = {key: [(step, values[key]) for step, values in logged if key in values]
                   for key in ("train/loss", "val/loss", "val/acc")}  # fmt: skip
    records = read_metrics(Path(cfg.out_dir) / "metrics.jsonl")  # the source of truth: the same numbers
    assert history["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in records if "loss" in r]
    assert history["val/loss"] == [(r["step"], pytest.approx(r["val_loss"])) for r in records if "val_loss" in r]
    assert [step for step, _ in history["val/acc"]] == [10, 20]


def test_a_missing_tracker_package_is_a_clear_error_before_anything_is_written(make_config, monkeypatch, capsys):
    cfg = make_config()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name))
    assert main(cli(cfg.out_dir, "tracker=wandb")) == 2
    assert "tracker=wandb needs the wandb package: pip install -e '.[wandb]'" in capsys.readouterr().err
    assert not Path(cfg.out_dir).exists()


def test_an_out_dir_that_cannot_be_written_is_one_line_before_any_training(make_config, tmp_path, capsys):
    # Not writable (a path through a file here: a read-only folder does not stop root, who may run the tests).
    (tmp_path / "a_file").write_text("")
    assert main(cli(tmp_path / "a_file" / "run", "max_steps=2", "warmup_steps=0")) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot write to out_dir {tmp_path / 'a_file' / 'run'}: Not a directory; ")
    assert "Traceback" not in error
    # On resume: the run's files cannot be replaced (config.yaml a folder here), and last.pt stays as it was.
    cfg = make_config("max_steps=2", "warmup_steps=0")
    train(cfg)
    saved = (Path(cfg.out_dir) / "last.pt").read_bytes()
    (Path(cfg.out_dir) / "config.yaml").unlink()
    (Path(cfg.out_dir) / "config.yaml").mkdir()
    assert main(cli(cfg.out_dir, "max_steps=4", "warmup_steps=0", "resume=auto")) == 1
    assert "error: cannot write to out_dir" in capsys.readouterr().err
    assert (Path(cfg.out_dir) / "last.pt").read_bytes() == saved


def test_tensorboard_missing_is_a_clear_error_before_anything_is_written(make_config, monkeypatch, capsys):
    cfg = make_config()
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(cli(cfg.out_dir, "tensorboard=true")) == 2
    assert "tensorboard=true needs the tensorboard package" in capsys.readouterr().err
    assert not Path(cfg.out_dir).exists()


def test_evaluate_command_reproduces_the_recorded_metrics(make_config):
    cfg = make_config("max_steps=30", "warmup_steps=5", "eval_every=10")
    train(cfg)
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "stand_in_cli.py"), "evaluate", "--checkpoint", f"{cfg.out_dir}/best.pt"],
        cwd=ROOT, env=SCRIPT_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    recorded = checkpoint(cfg.out_dir, "best.pt")["metrics"]
    for name, value in recorded.items():
        assert f"{name}: {value:.6f}  (recorded at save: {value:.6f})" in result.stdout


def test_evaluate_of_a_folder_or_a_missing_file_is_one_line_exit_1(tmp_path, capsys):
    from {{ cookiecutter.package_name }}.evaluate import main as evaluate_main

    assert evaluate_main(["--checkpoint", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"error: checkpoint {tmp_path} is a folder, not a file (a run's out_dir")
    assert evaluate_main(["--checkpoint", str(tmp_path / "best.pt")]) == 1
    assert capsys.readouterr().err == f"error: checkpoint {tmp_path / 'best.pt'} does not exist\n"


def test_export_writes_the_weights_as_safetensors_and_the_config_beside_them(make_config, capsys):
    safetensors = pytest.importorskip("safetensors.torch", reason="needs the export extra: pip install -e '.[export]'")
    cfg = make_config("max_steps=6", "warmup_steps=0", "eval_every=3")
    train(cfg)
    for name in ("best.pt", "last.pt"):
        out = Path(cfg.out_dir) / f"{name}.safetensors"
        assert export_main([f"{cfg.out_dir}/{name}", str(out)]) == 0
        saved = checkpoint(cfg.out_dir, name)["model"]
        exported = safetensors.load_file(out)
        assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
        assert yaml.safe_load(out.with_suffix(".yaml").read_text()) == to_dict(cfg)
{%- if cookiecutter.loop == "plain" %}
    sharded = make_config("parallel=fsdp", "max_steps=3", "warmup_steps=0", name="fsdp")  # its last: a folder
    train(sharded)
    out = Path(sharded.out_dir) / "last.safetensors"
    assert export_main([f"{sharded.out_dir}/last", str(out)]) == 0
    step, weights = sharded_weights(Path(sharded.out_dir) / "last")
    assert step == 3 and all(torch.equal(safetensors.load_file(out)[k], w) for k, w in weights.items())
{%- endif %}
    capsys.readouterr()
    assert export_main([f"{cfg.out_dir}/nowhere.pt", str(Path(cfg.out_dir) / "x.safetensors")]) == 1
    assert capsys.readouterr().err == f"error: checkpoint {cfg.out_dir}/nowhere.pt does not exist\n"
    assert export_main([f"{cfg.out_dir}/best.pt", str(Path(cfg.out_dir) / "no-such-folder" / "x.safetensors")]) == 1
    assert capsys.readouterr().err.startswith("error: could not write ")
    assert not (Path(cfg.out_dir) / "x.safetensors").exists()


def test_debug_runs_every_part_in_a_few_steps_beside_the_real_run(make_config, monkeypatch):
    cfg = make_config()
    Path(cfg.out_dir).mkdir(parents=True)
    (Path(cfg.out_dir) / "last.pt").write_bytes(b"a real run's state")
    batches = {"n": 0}

    def counted(output, target, task):
        batches["n"] += 1
        return stand_in.metric_totals(output, target, task)

    monkeypatch.setattr(validation_module, "metric_totals", counted)
    for _ in range(2):  # its folder is replaced each time
        assert main(cli(cfg.out_dir, "max_steps=5000", "eval_every=500", "debug=true")) == 0
    assert batches["n"] == 2 * DEBUG_EVAL_BATCHES  # of the validation set's 16 batches
    debug = Path(f"{cfg.out_dir}-debug")
    records = read_metrics(debug / "metrics.jsonl")
    assert [r["step"] for r in records if "skipped" in r] == [1, 2, 3, 4]  # fp16 may skip, not leave out
    assert [r["step"] for r in records if "val_loss" in r] == [4]  # one evaluation, best.pt and last.pt saved
    assert checkpoint(debug)["step"] == 4 and checkpoint(debug, "best.pt")["step"] == 4
    assert (Path(cfg.out_dir) / "last.pt").read_bytes() == b"a real run's state"


# An error in the user's code (data.py, task.py) with DataLoader workers: the run ends at once, the error shown
# once. Before workers_ended, the process printed the traceback and then waited for its workers forever.
ENDS_WITHIN_SECONDS = 90  # a run of a few steps takes 5 to 15 s here, on a busy machine too


@pytest.mark.parametrize(
    ("where", "stream"),
    [("loss:15", ""), ("metrics:3", ""), ("data:100", ""), ("data:100", "plain")],
    ids=["compute_loss", "metric_totals", "a-sample-in-a-worker", "a-stream-record-in-a-worker"],
)
def test_a_run_with_workers_ends_soon_after_an_error_in_the_users_code(tmp_path, where, stream):
    command = [sys.executable, str(ROOT / "tests" / "stand_in_cli.py"), "train", f"--fail={where}"]
    overrides = [f"out_dir={tmp_path / 'run'}", *RUN, "num_workers=2"]
    env = {**SCRIPT_ENV, "STAND_IN_STREAM": stream}
    started = time.perf_counter()
    try:
        result = subprocess.run(
            [*command, *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=ENDS_WITHIN_SECONDS
        )
    except subprocess.TimeoutExpired as e:
        printed = (e.stderr or b"").decode()[-2000:]
        pytest.fail(f"still running {ENDS_WITHIN_SECONDS}s after it started; it printed:\n{printed}")
    print(f"{where}: exit {result.returncode} after {time.perf_counter() - started:.1f}s")
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("InjectedFailure: injected failure in") == 1, result.stderr[-3000:]


def test_evaluate_with_workers_ends_soon_after_an_error_in_metric_totals(make_config, tmp_path):
    cfg = make_config("max_steps=4", "warmup_steps=0", "eval_every=4", "ckpt_every=4")
    train(cfg)
    command = [sys.executable, str(ROOT / "tests" / "stand_in_cli.py"), "evaluate", "--fail=metrics:2"]
    arguments = ["--checkpoint", str(Path(cfg.out_dir) / "best.pt"), "num_workers=2"]
    run = [*command, *arguments]
    result = subprocess.run(run, cwd=ROOT, env=SCRIPT_ENV, capture_output=True, text=True, timeout=ENDS_WITHIN_SECONDS)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("InjectedFailure: injected failure in metric_totals") == 1, result.stderr[-3000:]


def test_export_of_best_pt_writes_best_pts_weights_not_the_runs_last(make_config, monkeypatch):
    safetensors = pytest.importorskip("safetensors.torch", reason="needs the export extra: pip install -e '.[export]'")
    scripted = iter([1.0, 2.0])  # the best at step 3, then worse at step 6: best.pt and last.pt differ
    metrics = lambda *args, **kwargs: {"val_loss": next(scripted), "val_acc": 0.0, "val_class_acc": 0.0}  # noqa: E731
    monkeypatch.setattr(validation_module, "evaluate", metrics)
    cfg = make_config("max_steps=6", "warmup_steps=0", "eval_every=3")
    train(cfg)
    best, last = (checkpoint(cfg.out_dir, name)["model"] for name in ("best.pt", "last.pt"))
    assert any(not torch.equal(best[key], last[key]) for key in best)
    out = Path(cfg.out_dir) / "best.safetensors"
    assert export_main([f"{cfg.out_dir}/best.pt", str(out)]) == 0
    exported = safetensors.load_file(out)
    assert exported.keys() == best.keys() and all(torch.equal(exported[key], best[key]) for key in best)


class TiedModel(torch.nn.Module):
    """A language model's shape: the output layer shares the embedding's weights."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def test_a_model_with_tied_weights_exports_and_loads_back_tied_with_the_same_outputs(make_config, monkeypatch):
    safetensors = pytest.importorskip("safetensors.torch", reason="needs the export extra: pip install -e '.[export]'")
    monkeypatch.setattr(export_module, "build_model", lambda cfg: TiedModel())
    cfg, model = make_config(), TiedModel()
    Path(cfg.out_dir).mkdir(parents=True)
    save_checkpoint({"config": to_dict(cfg), "model": model.state_dict()}, Path(cfg.out_dir) / "tied.pt")
    out = Path(cfg.out_dir) / "tied.safetensors"
    assert export_main([f"{cfg.out_dir}/tied.pt", str(out)]) == 0
    loaded = TiedModel()
    safetensors.load_model(loaded, out)
    tokens = torch.arange(16)
    assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr()
    assert torch.equal(loaded(tokens), model(tokens))


def test_an_error_data_py_raises_as_config_error_is_one_line_exit_2(make_config, monkeypatch, capsys):
    # What docs/your-task.md tells a data.py to do with a missing file: one line, not a traceback.
    def missing(cfg):
        raise ConfigError("task.data_dir 'shards' does not exist: run prepare.py first")

    monkeypatch.setattr(train_module, "build_datasets", missing)
    assert main(cli(make_config().out_dir)) == 2
    assert capsys.readouterr().err == "error: task.data_dir 'shards' does not exist: run prepare.py first\n"


def test_the_progress_line_shows_tokens_per_second_only_for_a_loss_of_several_terms_a_sample(
    make_config, monkeypatch, caplog
):
    real_loss = train_module.compute_loss

    def one_term_a_sample(output, target):  # a classifier's loss: its count is the batch's samples
        loss_sum, _ = real_loss(output, target)
        return loss_sum, target.shape[0]

    lines = {}
    for name, loss in (("tokens", real_loss), ("samples", one_term_a_sample)):
        monkeypatch.setattr(train_module, "compute_loss", loss)
        caplog.clear()
        with caplog.at_level("INFO"):
            train(make_config("max_steps=20", "log_every=10", "progress=false", name=name))
        lines[name] = next(line for line in caplog.messages if line.startswith("step 10/"))
    assert " tokens/s" in lines["tokens"] and " tokens/s" not in lines["samples"], lines
