"""Bake the template with every option value and prove each baked project works."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cookiecutter.exceptions import FailedHookException
from cookiecutter.main import cookiecutter

from .conftest import BAKE_TIMES, DEFAULTS, TEMPLATE, bake

# Four bakes cover every value of every choice variable (the first is all defaults but its one-word name), and
# names of one word, with a digit, and starting with one.
BAKES = {
    "digits": {"project_name": "Digits"},
    "accelerate-bf16-onecycle-apache": {
        "project_name": "3D Vision",
        "loop": "accelerate",
        "precision": "bf16",
        "lr_schedule": "onecycle",
        "license": "Apache-2.0",
    },
    "fp16-step-bsd": {"precision": "fp16", "lr_schedule": "step", "license": "BSD-3-Clause"},
    "fp32-nolicense-nosmoke": {
        "project_name": "Vision Lab 2",
        "precision": "fp32",
        "lr_schedule": "warmup_cosine",
        "license": "none",
        "run_smoke_test": False,
    },
}
# Bake + smoke training, against the time this machine takes to import torch, measured right after: a
# ratio holds on a busy machine, where both slow down, as a number of seconds does not. About 2 when idle.
HOOK_TO_TORCH_IMPORT_LIMIT = 5.0
YOUR_TASK_TESTS = "tests/test_your_task.py"


class Baked:
    def __init__(self, name: str, path: Path, context: dict, seconds: float, output: str):
        self.name, self.path, self.context, self.seconds, self.output = name, path, context, seconds, output
        self.answers = {**{k: v[0] if isinstance(v, list) else v for k, v in DEFAULTS.items()}, **context}
        self.package = json.loads((path / ".cookiecutter.json").read_text())["cookiecutter"]["package_name"]


@pytest.fixture(scope="module", params=list(BAKES), ids=list(BAKES))
def baked(request, tmp_path_factory, user_config) -> Baked:
    context = BAKES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    # The hooks run as subprocesses writing to file descriptor 1: point it at a file
    # (capfd is function-scoped, this fixture is not).
    log = out.parent / f"{request.param}-hook-output.txt"
    saved_stdout = os.dup(1)
    with log.open("wb") as f:
        os.dup2(f.fileno(), 1)
        try:
            started = time.perf_counter()
            path = bake(out, user_config, **context)
            seconds = time.perf_counter() - started
        finally:
            os.dup2(saved_stdout, 1)
            os.close(saved_stdout)
    return Baked(request.param, path, context, seconds, log.read_text())


def project_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_no_template_syntax_left_in_paths_or_files(baked):
    for path in [baked.path, *baked.path.rglob("*")]:
        rel = str(path.relative_to(baked.path.parent))
        assert "{{" not in rel and "{%" not in rel, rel
        if path.is_file():
            text = path.read_text()
            for marker in ("{{", "{%", "{#"):
                assert marker not in text, f"{marker!r} left in {rel}"


def test_python_compiles_and_passes_ruff(baked):
    python_files = [p for p in project_files(baked.path) if p.suffix == ".py"]
    assert len(python_files) >= 15
    for path in python_files:
        compile(path.read_text(), str(path), "exec")  # a SyntaxError fails the test
    ruff = [sys.executable, "-m", "ruff"]
    subprocess.run([*ruff, "check", "--no-cache", "."], cwd=baked.path, check=True)
    subprocess.run([*ruff, "format", "--no-cache", "--check", "."], cwd=baked.path, check=True)


# The loop is read and copied: a step in one short function, the loop in a file that can be read in one sitting.
TRAIN_PY_LINES, FUNCTION_LINES, PARAMETERS, TRAIN_STEP_LINES = 350, 80, 6, 40


def test_the_loop_stays_short_enough_to_read(baked):
    package = baked.path / baked.package
    assert len((package / "train.py").read_text().splitlines()) <= TRAIN_PY_LINES
    lengths = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lengths[f"{path.relative_to(package).as_posix()}:{node.name}"] = node.end_lineno - first + 1
                a = node.args
                names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if p]
                assert len([n for n in names if n not in ("self", "cls")]) <= PARAMETERS, f"{path.name}:{node.name}"
    assert max(lengths.values()) <= FUNCTION_LINES, max(lengths, key=lengths.get)
    assert lengths["train.py:train_step"] <= TRAIN_STEP_LINES


# The house a newcomer enters: what is theirs and what runs at the top, the lesson in essentials/ (a file per
# essential), the machinery in machinery/; the README a front door to docs/.
YOURS = {"data.py", "model.py", "task.py"}
ESSENTIAL_FILES = {"config.py", "seed.py", "precision.py", "clipping.py", "schedule.py", "validation.py"}
ESSENTIAL_FILES |= {"checkpoint.py"}  # 6. is validation.py and checkpoint.py
TOP_LEVEL_FILES, TRAIN_PY_MODULES, README_LINES, DOCS_PAGES = 9, 10, 250, 4


def project_modules_imported(package: Path, path: Path) -> set[str]:
    """The package's own modules that ``path`` imports from (``from .x import y``: .x; ``from . import x``: .x)."""
    here = path.relative_to(package).parent.parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - node.level + 1]
            module = (*base, *(node.module.split(".") if node.module else ()))
            submodules = [(*module, alias.name) for alias in node.names]
            is_module = [(package.joinpath(*name).with_suffix(".py")).exists() for name in submodules]
            found.update(".".join(name) for name, yes in zip(submodules, is_module, strict=True) if yes)
            if not all(is_module):
                found.add(".".join(module))
    return found


def test_the_layout_shows_what_is_yours_the_lesson_and_the_machinery(baked):
    package = baked.path / baked.package
    top = {path.name for path in package.glob("*.py")} - {"__init__.py"}
    assert YOURS <= top and "train.py" in top and len(top) <= TOP_LEVEL_FILES, sorted(top)
    assert ESSENTIAL_FILES <= {path.name for path in (package / "essentials").glob("*.py")}
    machinery = {path.name for path in (package / "machinery").glob("*.py")}
    assert {"distributed.py", "loader.py", "run_folder.py"} <= machinery
    imported = project_modules_imported(package, package / "train.py")
    assert len(imported) <= TRAIN_PY_MODULES, sorted(imported)
    readme = (baked.path / "README.md").read_text()
    assert len(readme.splitlines()) <= README_LINES
    linked = re.findall(r"\]\((docs/[\w-]+\.md)\)", readme)
    pages = sorted(p.relative_to(baked.path).as_posix() for p in (baked.path / "docs").glob("*.md"))
    assert len(pages) >= DOCS_PAGES and sorted(set(linked)) == pages, (linked, pages)
    for name in sorted(ESSENTIAL_FILES | YOURS):  # the layout section names each file a newcomer looks for
        assert name in readme.split("## Layout", 1)[1].split("\n## ", 1)[0], name


def test_the_readmes_anatomy_of_a_step_is_the_code_and_follows_the_lesson(baked):
    section = (baked.path / "README.md").read_text().split("## Anatomy of a step\n", 1)[1].split("\n## ", 1)[0]
    shown = section.split("```python\n", 1)[1].split("\n```", 1)[0]
    source = (baked.path / baked.package / "train.py").read_text()
    step = next(node for node in ast.parse(source).body if getattr(node, "name", None) == "train_step")
    assert shown == "\n".join(source.splitlines()[step.lineno - 1 : step.end_lineno])
    essentials = ["**Config**", "**Seed**", "**Mixed precision**", "**Gradient clipping**", "**LR schedule**",
                  "**Validation + best checkpoint**", "**Accumulation**"]  # fmt: skip
    places = [section.index(essential) for essential in essentials]
    assert places == sorted(places)


def test_answers_are_kept_for_updates(baked):
    kept = json.loads((baked.path / ".cookiecutter.json").read_text())["cookiecutter"]
    for key in ("precision", "lr_schedule", "loop", "license", "run_smoke_test", "project_name"):
        assert kept[key] == baked.answers[key]
    assert kept["_template"] == str(TEMPLATE)


def test_choices_become_the_generated_defaults(baked):
    cfg = yaml.safe_load((baked.path / "configs" / "default.yaml").read_text())
    assert cfg["precision"] == baked.answers["precision"]
    assert cfg["lr_schedule"] == baked.answers["lr_schedule"]
    config_py = (baked.path / baked.package / "essentials" / "config.py").read_text()
    assert f'precision: str = "{baked.answers["precision"]}"' in config_py
    assert f'lr_schedule: str = "{baked.answers["lr_schedule"]}"' in config_py


def test_license_matches_the_choice(baked):
    license_file = baked.path / "LICENSE"
    pyproject = (baked.path / "pyproject.toml").read_text()
    if baked.answers["license"] == "none":
        assert not license_file.exists()
        assert "license" not in pyproject
    else:
        first_words = {"MIT": "MIT License", "BSD-3-Clause": "BSD 3-Clause License", "Apache-2.0": "Copyright"}
        assert license_file.read_text().startswith(first_words[baked.answers["license"]])
        assert baked.answers["author_name"] in license_file.read_text()
        assert f'license = {{ text = "{baked.answers["license"]}" }}' in pyproject


def test_post_gen_hook_smoke_trains_or_skips_as_asked(baked):
    if baked.answers["run_smoke_test"]:
        lines = [line for line in baked.output.splitlines() if line.startswith("smoke training passed:")]
        assert len(lines) == 1, baked.output
        assert "reproduced from best.pt" in lines[0]
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        ratio = baked.seconds / (time.perf_counter() - started)
        assert ratio < HOOK_TO_TORCH_IMPORT_LIMIT, f"bake took {baked.seconds:.1f}s, {ratio:.1f} torch imports"
        BAKE_TIMES[baked.name] = baked.seconds
    else:
        assert "smoke training" not in baked.output
    assert not list(baked.path.rglob("__pycache__")), "the hook left bytecode in the project"
    assert not (baked.path / "runs").exists()


def reject_own_defaults(task_py: Path) -> None:
    """Make task.py refuse its own settings, as a user's may on a machine without its data: building its
    TaskConfig raises, and check_task_config finds a problem with any settings."""
    problem = "task.text_file 'input.txt' does not exist"
    task_py.write_text(
        task_py.read_text()
        + "\n\n_check = check_task_config\n\n\n@dataclass\nclass TaskConfig(TaskConfig):\n"
        + f"    def __post_init__(self):\n        raise FileNotFoundError({problem!r})\n"
        + f"\n\ndef check_task_config(task):\n    return [*_check(task), {problem!r}]\n"
    )


def test_baked_project_test_suite_passes(baked, tmp_path):
    # The torchrun and torch.compile tests do not depend on the other options: the first bake runs them, and the
    # Accelerate bake its torchrun tests. Both run every loop test on a task.py that refuses its own defaults
    # (the loop's tests never build the user's TaskConfig), and its own tests on the task.py baked.
    full = {"digits": [], "accelerate-bf16-onecycle-apache": ["-m", "not slow"]}
    runs = [(baked.path, full.get(baked.name, ["-m", "not distributed and not slow"]))]
    if baked.name in full:
        refusing = tmp_path / baked.path.name
        shutil.copytree(baked.path, refusing)
        reject_own_defaults(refusing / baked.package / "task.py")
        own_run = subprocess.run([sys.executable, "-m", f"{baked.package}.train", "max_steps=1"], cwd=refusing,
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
        assert own_run.returncode == 1 and "task.text_file 'input.txt' does not exist" in own_run.stderr
        runs = [(refusing, [*full[baked.name], "--ignore=tests/test_your_task.py"]), (baked.path, [YOUR_TASK_TESTS])]
    for project, select in runs:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=1800,  # a whole suite, on a machine other jobs may keep busy (its tests have their own limits)
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        assert " passed" in result.stdout.splitlines()[-1]


def test_replaying_the_kept_answers_bakes_the_same_project(tmp_path, user_config):
    first = bake(tmp_path / "first", user_config, **BAKES["fp32-nolicense-nosmoke"])
    again = Path(
        cookiecutter(
            str(TEMPLATE),
            replay=str(first / ".cookiecutter.json"),
            output_dir=str(tmp_path / "again"),
            config_file=user_config,
        )
    )
    files = project_files(first)
    assert sorted(p.relative_to(first) for p in files) == sorted(p.relative_to(again) for p in project_files(again))
    for path in files:
        assert (again / path.relative_to(first)).read_bytes() == path.read_bytes(), path


def test_a_name_that_starts_with_a_digit_gets_a_valid_package_name(tmp_path, user_config):
    path = bake(tmp_path, user_config, project_name="3D Vision!", run_smoke_test=False)
    assert path.name == "3d-vision"
    assert (path / "project_3d_vision" / "train.py").exists()


def test_a_model_py_without_blocks_still_trains(tmp_path, user_config):
    # A model.py written for one GPU need not name its blocks: each child with parameters is one then.
    path = bake(tmp_path, user_config, run_smoke_test=False)
    model_py = path / "my_training_project" / "model.py"
    source = model_py.read_text()
    without = re.sub(r"\ndef blocks\(.*?\n(?=\n\ndef )", "\n", source, flags=re.DOTALL)
    assert "def blocks" in source and "def blocks" not in without
    model_py.write_text(without)
    result = subprocess.run(
        [sys.executable, "-m", "my_training_project.train", "--config", "configs/smoke.yaml", "max_steps=2",
         "warmup_steps=0", "activation_checkpointing=true", "out_dir=runs/no-blocks"],
        cwd=path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", YOUR_TASK_TESTS],
                            cwd=path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"package_name": "1model"}, "is not a valid Python identifier"),
        ({"package_name": "my-model"}, "is not a valid Python identifier"),
        ({"package_name": "class"}, "is a Python keyword"),
        ({"package_name": "random"}, "would shadow the module of the same name"),
        ({"package_name": "torch"}, "would shadow the module of the same name"),
        ({"package_name": "test"}, "would shadow the module of the same name"),
        ({"package_name": "accelerate"}, "would shadow the module of the same name"),
        ({"package_name": "stand_in"}, "would shadow the module of the same name"),
        ({"project_slug": "My Project!", "package_name": "my_project"}, "is not a valid folder/distribution name"),
    ],
)
def test_pre_gen_hook_rejects_bad_names_and_leaves_nothing(tmp_path, user_config, capfd, context, message):
    with pytest.raises(FailedHookException):
        bake(tmp_path, user_config, run_smoke_test=False, **context)
    err = capfd.readouterr().err
    assert message in err and err.count("error:") == 1
    assert list(tmp_path.iterdir()) == []


def sabotaged_template(tmp_path: Path, smoke_yaml_extra: str) -> Path:
    copy = tmp_path / "template"
    shutil.copytree(TEMPLATE, copy, ignore=shutil.ignore_patterns(".git", ".venv", "baked", "tests", "__pycache__"))
    smoke = copy / "{{cookiecutter.project_slug}}" / "configs" / "smoke.yaml"
    smoke.write_text(smoke.read_text() + smoke_yaml_extra)
    return copy


def test_post_gen_hook_fails_loudly_when_the_model_does_not_learn(tmp_path, user_config, capfd):
    template = sabotaged_template(tmp_path, "lr: 1.0e-7\nmin_lr: 0\n")  # far too small to learn anything
    out = tmp_path / "out"
    with pytest.raises(FailedHookException):
        bake(out, user_config, template=template)
    err = capfd.readouterr().err
    assert "smoke training failed: val_acc" in err and "(expected >= 0.9)" in err
    assert not out.exists() or list(out.iterdir()) == []  # cookiecutter removes the failed project


def test_post_gen_hook_without_torch_explains_and_keeps_the_project(tmp_path, user_config, capfd, monkeypatch):
    fake = tmp_path / "fake-site"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    project = bake(tmp_path / "out", user_config)
    out = capfd.readouterr().out
    assert "smoke training skipped: torch not installed" in out
    assert "configs/smoke.yaml" in out
    assert (project / "pyproject.toml").exists()


def test_template_sources_pass_ruff():
    # The hooks, these tests and the benchmark; the project template itself is linted after baking, above.
    ruff = [sys.executable, "-m", "ruff"]
    subprocess.run([*ruff, "check", "--no-cache", "hooks", "tests", "benchmarks"], cwd=TEMPLATE, check=True)
    subprocess.run([*ruff, "format", "--no-cache", "--check", "hooks", "tests", "benchmarks"], cwd=TEMPLATE, check=True)


def test_readme_bake_command(tmp_path):
    # scripts/bake, as the README shows it, with an output folder and an answer (it reuses .venv).
    result = subprocess.run(
        [str(TEMPLATE / "scripts" / "bake"), str(tmp_path), "project_name=Readme Bake"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BLANK_LOOP_VENV": str(Path(sys.executable).parent.parent)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke training passed:" in result.stdout
    assert (tmp_path / "readme-bake" / "readme_bake" / "train.py").exists()
    # Where the project went and what to run next.
    assert f"project: {tmp_path / 'readme-bake'}" in result.stdout
    assert "python -m readme_bake.train --config configs/smoke.yaml" in result.stdout


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        (["precison=bf16"], "error: unknown option 'precison': did you mean 'precision'?"),
        (["precision=fp64"], "error: precision=fp64 is not one of auto, bf16, fp16, fp32"),
        (["run_smoke_test=maybe"], "error: run_smoke_test=maybe must be true or false"),
        (["bf16"], "error: 'bf16' is not key=value"),
        (["package_name=torch"], "error: package_name 'torch' would shadow the module of the same name"),
    ],
)
def test_bake_script_rejects_a_wrong_answer_in_one_line(tmp_path, answers, message):
    command = [sys.executable, str(TEMPLATE / "scripts" / "bake.py"), str(tmp_path), *answers]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    hook = answers == ["package_name=torch"]  # checked by the pre-generation hook: exit 1, as cookiecutter's
    assert result.returncode == (1 if hook else 2) and result.stderr.splitlines()[-1].startswith(message), result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def test_bake_script_run_twice_says_what_to_do_and_replaces_when_told(tmp_path):
    def bake_script(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(TEMPLATE / "scripts" / "bake.py"), str(tmp_path), "run_smoke_test=false", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert bake_script().returncode == 0
    (tmp_path / "my-training-project" / "stale.txt").write_text("from before")
    again = bake_script()
    assert again.returncode == 2 and "already exists: pass --replace" in again.stderr.splitlines()[-1]
    assert bake_script("--replace").returncode == 0
    assert not (tmp_path / "my-training-project" / "stale.txt").exists()  # replaced, not written over


def test_generated_ci_workflow_installs_lints_and_tests(baked):
    workflow = yaml.safe_load((baked.path / ".github" / "workflows" / "ci.yml").read_text())
    commands = "\n".join(step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"])
    assert "download.pytorch.org/whl/cpu" in commands  # the CPU build: no CUDA download on CI runners
    assert 'pip install -e ".[dev,plot,export]"' in commands
    assert "ruff check ." in commands and "ruff format --check ." in commands and "pytest" in commands
