"""Every shell command in the generated README and its docs pages runs, so the docs cannot rot.

Commands run in order in a baked project, as written, with these changes for a
2-core CPU machine without a GPU or a cluster: training runs are cut to a few
steps (overrides appended), GPU devices become the CPU, torchrun uses 2
processes on this one machine, `accelerate launch --multi_gpu` 2 CPU processes
(as the README says it does without GPUs), SLURM's srun/scontrol are stand-ins, and pytest
only collects (the suite itself runs in test_bake.py). Python snippets must compile.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import bake

SHORT_RUN = "max_steps=30 warmup_steps=5 eval_every=10 ckpt_every=10 log_every=10 num_threads=1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blocks(readme: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", readme, flags=re.DOTALL)


def pages(project: Path) -> dict[str, str]:
    """The README, then each docs page in the order the README links them: {path: text}."""
    readme = (project / "README.md").read_text()
    linked = dict.fromkeys(re.findall(r"\]\((docs/[\w-]+\.md)\)", readme))
    return {"README.md": readme, **{path: (project / path).read_text() for path in linked}}


def all_blocks(project: Path, language: str) -> list[str]:
    return [block for text in pages(project).values() for block in blocks(text, language)]


def for_this_machine(line: str, package: str) -> str:
    command, hash_, comment = line.partition(" # ")
    return for_this_machine_command(command.rstrip(), package) + (f"  {hash_}{comment}" if hash_ else "")


def for_this_machine_command(command: str, package: str) -> str:
    if command.startswith("pytest"):
        return command + " --collect-only"
    if f"-m {package}.train" in command:
        command = re.sub(r"device=cuda(:\d+)?\b", "device=cpu", command)
        command = command.replace("--multi_gpu --num_processes=8", "--multi_gpu --num_processes=2")
        command = command.replace("--nproc_per_node=8", "--nproc_per_node=2")
        command = command.replace("--nnodes=2", "--nnodes=1").replace("HOST0:29500", f"localhost:{free_port()}")
        command = re.sub(r"( resume=auto)", rf"\1 {SHORT_RUN}", command) if "resume=auto" in command else command
        if SHORT_RUN not in command:
            command += f" {SHORT_RUN}"
    return command


def script(block: str, package: str) -> str:
    lines = block.replace("\\\n", " ").splitlines()  # join continued lines
    return "\n".join(for_this_machine(line, package) for line in lines)


@pytest.fixture(scope="module")
def project(tmp_path_factory, user_config):
    path = bake(tmp_path_factory.mktemp("readme"), user_config, run_smoke_test=False)
    yield path
    # The README's pip install -e put the project into this environment: take it out again.
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", path.name], capture_output=True)


def run_blocks(project: Path, commands: list[str]) -> None:
    package = project.name.replace("-", "_")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_NAME": "readme", "SLURM_JOB_ID": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # fmt: skip
    stand_ins = 'srun() { "$@"; }\nscontrol() { echo "scontrol $*"; }\n'
    for block in commands:
        body = script(block, package)
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", stand_ins + body], cwd=project, env=env,
                                capture_output=True, text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, f"README block failed:\n{body}\n--- stdout\n{result.stdout[-3000:]}\n" \
                                       f"--- stderr\n{result.stderr[-3000:]}"  # fmt: skip


def test_readme_shell_commands_run(project):
    commands = all_blocks(project, "bash")
    assert len(commands) >= 6
    run_blocks(project, commands)
    # What the quickstart promised exists.
    assert (project / "runs" / "smoke" / "curves.png").exists()
    assert (project / "runs" / "try1" / "best.pt").exists()
    assert (project / "runs" / "ddp" / "last.pt").exists()
    assert (project / "runs" / "readme-1" / "last.pt").exists()  # the SLURM example's run


def test_the_accelerate_readmes_own_commands_run(project, tmp_path_factory, user_config):
    # Its other commands are the plain README's, run above.
    accelerate = bake(tmp_path_factory.mktemp("accelerate"), user_config, run_smoke_test=False, loop="accelerate")
    plain = set(all_blocks(project, "bash"))
    own = [block for block in all_blocks(accelerate, "bash") if block not in plain]
    assert len(own) == 3 and any(block.startswith("accelerate launch") for block in own), own
    run_blocks(accelerate, own)
    for run in ("ddp", "ddp-cpu"):  # accelerate launch --multi_gpu, then torchrun: 2 processes each
        saved = torch.load(accelerate / "runs" / run / "last.pt", weights_only=True)
        assert len(saved["rng"]) == 2, run  # the random streams of each process


def test_readme_python_snippets_compile(project):
    snippets = all_blocks(project, "python")
    assert len(snippets) >= 5
    for snippet in snippets:
        compile(snippet, "README snippet", "exec")


def example(project: Path, heading: str) -> tuple[dict[str, str], str]:
    """A task example of the docs: {path: whole file} from its Python blocks, and its task: YAML group."""
    page = next(text for text in pages(project).values() if f"\n### {heading}" in text)
    section = page.split(f"\n### {heading}", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    files = {block.partition("\n")[0].removeprefix("# "): block for block in blocks(section, "python")}
    return files, blocks(section, "yaml")[0]


def apply_example(project: Path, files: dict[str, str], task_group: str) -> None:
    """Write an example's files into a baked project, and its task: group into both configs."""
    for path, text in files.items():
        (project / path).write_text(text)
    for config in ("smoke.yaml", "default.yaml"):  # the task: group is the last thing in both
        path = project / "configs" / config
        text = path.read_text()
        path.write_text(text[: text.index("\ntask:") + 1] + task_group)


def run_in(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=project, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})  # fmt: skip


def lints_and_passes_its_task_tests(project: Path, env: dict | None = None) -> None:
    for lint in (["ruff", "check", "."], ["ruff", "format", "--check", "."]):
        result = run_in(project, *lint)
        assert result.returncode == 0, result.stdout + result.stderr
    collected = run_in(project, "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", env=env)
    assert collected.returncode == 0 and " tests collected" in collected.stdout, collected.stdout[-2000:]
    tests = ["tests/test_your_task.py", "tests/test_config.py"]
    result = run_in(project, "pytest", "-q", "-p", "no:cacheprovider", *tests, env=env)
    assert result.returncode == 0, result.stdout[-4000:]


@pytest.mark.parametrize("heading", ["A regression", "A language model"])
def test_a_readme_example_replaces_the_task_and_every_test_still_collects(tmp_path, user_config, heading):
    """Replacing data.py, model.py, task.py and the task: groups as the README says leaves a project that
    lints, collects every test, passes the tests of the task and of the config, and learns (test_your_task)."""
    project = bake(tmp_path, user_config, run_smoke_test=False)
    package = project.name.replace("-", "_")
    files, task_group = example(project, heading)
    assert sorted(files) == [f"{package}/data.py", f"{package}/model.py", f"{package}/task.py"]
    apply_example(project, files, task_group)
    (project / "input.txt").write_text("\n".join(pages(project).values()))  # the language model's text
    lints_and_passes_its_task_tests(project)


@pytest.mark.parametrize(
    ("heading", "num_workers"),
    [("A stream of token blocks from a file", 2), ("A Hugging Face `datasets` stream", 0)],  # the file: one shard
)
def test_a_readme_streaming_example_trains_and_resumes_exactly(tmp_path, user_config, heading, num_workers):
    """The language model example with a streaming data.py, as the README says: it lints, passes the task's
    tests, and a run stopped at step 6 and resumed reaches step 12 with the uninterrupted run's weights."""
    project = bake(tmp_path, user_config, run_smoke_test=False)
    package = project.name.replace("-", "_")
    apply_example(project, *example(project, "A language model"))
    files, task_group = example(project, heading)
    apply_example(project, files, task_group)
    (project / "input.txt").write_text("\n".join(pages(project).values()))
    if "prepare.py" in files:  # the token file's: data/train.bin and data/val.bin, the text's bytes
        task = project / package / "task.py"
        task.write_text(task.read_text().replace('text_file: str = "input.txt"', 'data_dir: str = "data"'))
        assert run_in(project, "prepare").returncode == 0
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # local files only: nothing is downloaded
    lints_and_passes_its_task_tests(project, env=offline)
    run = ["--config", "configs/smoke.yaml", "decay_steps=12", "warmup_steps=2", "eval_every=6", "ckpt_every=6",
           "log_every=3", "num_threads=1", f"num_workers={num_workers}"]  # fmt: skip
    for out_dir, steps in (("whole", 12), ("stopped", 6), ("stopped", 12)):
        extra = ["resume=auto"] if steps == 12 and out_dir == "stopped" else []
        result = run_in(project, f"{package}.train", *run, f"max_steps={steps}", f"out_dir=runs/{out_dir}", *extra,
                        env=offline)  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "a resumed run continues it by its own state_dict()" in result.stdout
    assert "resumed from runs/stopped/last.pt at step 6" in result.stdout
    whole, resumed = (torch.load(project / "runs" / run / "last.pt", weights_only=True) for run in ("whole", "stopped"))
    assert whole["step"] == resumed["step"] == 12
    for name, weights in whole["model"].items():
        assert torch.equal(weights, resumed["model"][name]), name


def test_the_several_validation_sets_example_trains_evaluates_each_and_monitors_one(tmp_path, user_config):
    project = bake(tmp_path, user_config, run_smoke_test=False)
    package = project.name.replace("-", "_")
    section = pages(project)["docs/your-task.md"].split("\n## Several validation sets", 1)[1].split("\n## ", 1)[0]
    (example,) = blocks(section, "python")
    data = project / package / "data.py"
    text = data.read_text()
    data.write_text(text[: text.index("def build_datasets")] + example)  # the example's build_datasets in place
    lint = run_in(project, "ruff", "check", str(data))
    assert lint.returncode == 0, lint.stdout
    out_dir = tmp_path / "run"
    trained = run_in(project, f"{package}.train", "--config", "configs/smoke.yaml", f"out_dir={out_dir}",
                     "monitor=shifted/val_acc", *SHORT_RUN.split())  # fmt: skip
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "shifted/val_acc" in r]
    assert len(evaluations) == 3 and all("in_dist/val_loss" in r for r in evaluations)
    assert "best shifted/val_acc:" in trained.stdout
    report = run_in(project, f"{package}.evaluate", "--checkpoint", str(out_dir / "best.pt"))
    assert report.returncode == 0, report.stderr
    assert [line.split(":")[0] for line in report.stdout.splitlines()] == [
        f"{name}/{metric}" for name in ("in_dist", "shifted") for metric in ("val_loss", "val_acc")]  # fmt: skip
    refused = run_in(project, f"{package}.train", "--config", "configs/smoke.yaml", f"out_dir={tmp_path / 'r2'}")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: monitor 'val_loss': build_datasets returned validation sets by name (in_dist, shifted); say whose, "
        "e.g. monitor=in_dist/val_loss"]  # fmt: skip
