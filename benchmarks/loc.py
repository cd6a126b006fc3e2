"""Code lines of a baked project, by essential: no comments, blank lines or docstrings.

    python benchmarks/loc.py BAKED_PROJECT [BAKED_PROJECT ...]

Each essential is a list of files and functions of the package ("train.py:run"), by their
path in the package; a file counts the lines its listed functions do not. A name missing
from a project counts 0.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

ESSENTIALS = {
    "config": ["essentials/config.py"],
    "seed": ["essentials/seed.py"],
    "mixed precision": ["essentials/precision.py"],
    "gradient clipping": ["essentials/clipping.py"],
    "accumulation": ["train.py:divide_gradients", "machinery/distributed.py:no_gradient_sync"],
    "LR schedule": ["essentials/schedule.py"],
    "validation + best checkpoint": ["essentials/validation.py"],
    "non-finite guard": ["essentials/optimizer.py:optimizer_step", "machinery/state.py:StepLog"],
    "device and processes (DDP, FSDP)": ["machinery/distributed.py"],
    "checkpoints and resume": ["essentials/checkpoint.py", "machinery/state.py", "machinery/loader.py"],
    "the run folder": ["machinery/run_folder.py"],
    "the loop: train_step, set_up, run": ["train.py:train_step", "train.py:set_up", "train.py:train", "train.py:run"],
}


def code_lines(source: str) -> dict[str | None, int]:
    """Code lines of each top-level function or class (by name), and of the rest of the file (None)."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    lines = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(n for n in range(token.start[0], token.end[0] + 1) if n not in docstrings)
    owner = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            owner.update(dict.fromkeys(range(first, node.end_lineno + 1), node.name))
    counts: dict[str | None, int] = {}
    for n in lines:
        counts[owner.get(n)] = counts.get(owner.get(n), 0) + 1
    return counts


def code_lines_by_essential(project: Path) -> dict[str, int]:
    package = project / project.name.replace("-", "_")
    paths = sorted(package.rglob("*.py"))
    per_file = {path.relative_to(package).as_posix(): code_lines(path.read_text()) for path in paths}
    claimed = {tuple(unit.split(":")) for units in ESSENTIALS.values() for unit in units if ":" in unit}
    result = {}
    for essential, units in ESSENTIALS.items():
        total = 0
        for unit in units:
            file, _, name = unit.partition(":")
            counts = per_file.get(file, {})
            if name:
                total += counts.get(name, 0)
            else:  # the whole file, less the functions listed elsewhere
                total += sum(n for owner, n in counts.items() if (file, owner) not in claimed)
        result[essential] = total
    result["whole package"] = sum(sum(counts.values()) for counts in per_file.values())
    return result


if __name__ == "__main__":
    projects = [Path(arg).resolve() for arg in sys.argv[1:]]
    tables = {str(path): code_lines_by_essential(path) for path in projects}
    print("| essential | " + " | ".join(tables) + " |")
    print("| --- |" + " ---: |" * len(tables))
    for essential in next(iter(tables.values())):
        print(f"| {essential} | " + " | ".join(str(t[essential]) for t in tables.values()) + " |")
