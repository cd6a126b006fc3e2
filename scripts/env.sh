# Sourced by scripts/bake and scripts/test: a virtual environment in .venv with requirements-dev.txt.
# Progress goes to stderr, so that a first run (a few minutes) does not look stuck.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BLANK_LOOP_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating the environment $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when requirements-dev.txt changed since the last install.
if ! cmp -s "$ROOT/requirements-dev.txt" "$VENV/.requirements-dev.txt"; then
    pip=("$VENV/bin/python" -m pip install -qq --disable-pip-version-check)
    torch=$(grep -E '^torch==' "$ROOT/requirements-dev.txt" | cut -d' ' -f1)
    # PyTorch first: PyPI's Linux torch is the CUDA build (several GB). Without an NVIDIA GPU take PyTorch's
    # CPU build, unless a wheel is already on this machine (pip's find-links); its dependencies come below.
    if "${pip[@]}" --no-index --no-deps "$torch" 2>/dev/null; then
        echo "installed $torch from a wheel on this machine" >&2
    elif command -v nvidia-smi >/dev/null 2>&1; then
        echo "installing $torch, the CUDA build (an NVIDIA GPU is here; several GB)" >&2
        "${pip[@]}" "$torch"
    else
        echo "installing $torch, the CPU build (no NVIDIA GPU here; 190 MB to download, 750 MB installed)" >&2
        "${pip[@]}" "$torch" --index-url https://download.pytorch.org/whl/cpu
    fi
    echo "installing the rest of requirements-dev.txt into $VENV (cookiecutter, pytest, ruff, accelerate...)" >&2
    "${pip[@]}" -r "$ROOT/requirements-dev.txt"
    cp "$ROOT/requirements-dev.txt" "$VENV/.requirements-dev.txt"
fi
export PATH="$VENV/bin:$PATH"
