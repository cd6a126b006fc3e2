"""scripts/bake's work, run in .venv: check the answers, bake, say where the project is and what to run next.

    scripts/bake [OUTPUT_DIR] [key=value ...] [--replace]

Every mistake is one line on stderr and exit status 2: an unknown key (with the closest one), a value that
is not one of an option's choices, an existing project without --replace.
"""

from __future__ import annotations

import difflib
import json
import logging
import shutil
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1]


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    replace = "--replace" in argv
    args = [arg for arg in argv if arg != "--replace"]
    out = Path(args.pop(0)) if args and "=" not in args[0] else TEMPLATE / "baked"
    options = {k: v for k, v in json.loads((TEMPLATE / "cookiecutter.json").read_text()).items() if k[0] != "_"}
    answers = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key.startswith("-"):
            return fail(f"'{arg}' is not key=value (usage: scripts/bake [OUTPUT_DIR] [key=value ...] [--replace])")
        if key not in options:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"the options are {', '.join(options)}"
            return fail(f"unknown option '{key}': {hint}")
        choices = options[key]
        if isinstance(choices, list) and value not in choices:
            return fail(f"{key}={value} is not one of {', '.join(choices)}")
        if isinstance(choices, bool) and value.lower() not in ("true", "false"):
            return fail(f"{key}={value} must be true or false")
        answers[key] = value

    from cookiecutter.exceptions import FailedHookException, OutputDirExistsException
    from cookiecutter.main import cookiecutter

    # A hook that fails has printed its one line; cookiecutter would log its own traceback after it.
    logging.getLogger("cookiecutter").addHandler(logging.NullHandler())
    logging.getLogger("cookiecutter").propagate = False

    def bake() -> Path:
        return Path(cookiecutter(str(TEMPLATE), no_input=True, output_dir=str(out), extra_context=answers))

    print(f"baking into {out} (then a smoke training: a few seconds)", file=sys.stderr)
    try:
        try:
            project = bake()
        except OutputDirExistsException as e:
            existing = Path(str(e).split('"')[1])  # 'Error: "<path>" directory already exists'
            if not replace:
                return fail(f"{existing} already exists: pass --replace to bake over it, or give another OUTPUT_DIR")
            if not (existing / ".cookiecutter.json").exists():
                return fail(f"{existing} was not baked from this template: --replace leaves it alone; remove it first")
            shutil.rmtree(existing)  # a project this template baked: replaced, as asked
            project = bake()
    except FailedHookException:
        return 1  # the hook printed why
    package = json.loads((project / ".cookiecutter.json").read_text())["cookiecutter"]["package_name"]
    print(
        f"\nproject: {project}\nnext:\n  cd {project}\n  pip install torch --index-url "
        "https://download.pytorch.org/whl/cpu   # no NVIDIA GPU: the CPU build (skip it on a GPU machine)\n"
        f'  pip install -e ".[dev,plot,export]"\n  python -m {package}.train --config configs/smoke.yaml out_dir=runs/smoke'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
