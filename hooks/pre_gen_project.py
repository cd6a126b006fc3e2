"""Reject names that would make a broken project, before anything is generated."""

import keyword
import re
import sys

package_name = "{{ cookiecutter.package_name }}"
project_slug = "{{ cookiecutter.project_slug }}"

# Names the generated code imports: a package called like one of them would shadow it. "test" is
# CPython's own test package and pytest's naming convention; the others are the tests' helper modules.
TAKEN = set(getattr(sys, "stdlib_module_names", ())) | {"torch", "yaml", "numpy", "tqdm", "pytest", "tests", "test"}
TAKEN |= {"accelerate", "matplotlib", "tensorboard"}  # the loop=accelerate dependency, the optional extras
TAKEN |= {"stand_in", "stand_in_cli", "augment", "faults", "ddp_probe", "conftest"}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


if sys.version_info < (3, 10):  # noqa: UP036 (this hook runs on whatever Python cookiecutter uses)
    fail(f"the generated project needs Python >= 3.10; this is {sys.version.split()[0]}")
try:
    from cookiecutter import __version__ as cookiecutter_version
except ImportError:  # run by a tool that embeds cookiecutter differently: nothing to check
    cookiecutter_version = "2.7"
if tuple(int(part) for part in cookiecutter_version.split(".")[:2]) < (2, 7):
    fail(f"cookiecutter >= 2.7 is needed (real booleans on the command line); this is {cookiecutter_version}")
if not package_name.isidentifier() or not package_name.isascii():
    fail(f"package_name '{package_name}' is not a valid Python identifier (use letters, digits and underscores)")
if keyword.iskeyword(package_name):
    fail(f"package_name '{package_name}' is a Python keyword; choose another name")
if package_name in TAKEN:
    fail(f"package_name '{package_name}' would shadow the module of the same name; choose another name")
if not re.fullmatch(r"[a-z0-9]([a-z0-9._-]*[a-z0-9])?", project_slug):
    fail(
        f"project_slug '{project_slug}' is not a valid folder/distribution name "
        "(lowercase letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
    )
