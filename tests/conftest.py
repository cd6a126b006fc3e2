from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cookiecutter.main import cookiecutter

TEMPLATE = Path(__file__).resolve().parents[1]
DEFAULTS = json.loads((TEMPLATE / "cookiecutter.json").read_text())
BAKE_TIMES: dict[str, float] = {}  # bake + post-gen smoke training, seconds, by bake name


def pytest_terminal_summary(terminalreporter):
    if BAKE_TIMES:
        terminalreporter.section("bake + smoke training (post-gen hook), wall time")  # in the README
        for name, seconds in BAKE_TIMES.items():
            terminalreporter.write_line(f"{name}: {seconds:.2f}s")


@pytest.fixture(scope="session")
def user_config(tmp_path_factory) -> str:
    """A cookiecutter user config of our own, so no ~/.cookiecutterrc or replay dir leaks in or out."""
    home = tmp_path_factory.mktemp("cookiecutter-home")
    path = home / "config.yaml"
    path.write_text(
        f"cookiecutters_dir: {json.dumps(str(home / 'cookiecutters'))}\n"
        f"replay_dir: {json.dumps(str(home / 'replay'))}\n"
        "default_context: {}\n"
    )
    return str(path)


def bake(output_dir: Path, user_config: str, template: Path = TEMPLATE, **context) -> Path:
    """Bake with no input; return the project folder."""
    os.environ.pop("COOKIECUTTER_CONFIG", None)
    return Path(
        cookiecutter(
            str(template), no_input=True, extra_context=context, output_dir=str(output_dir), config_file=user_config
        )
    )
