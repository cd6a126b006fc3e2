# Sourced by scripts/bake and scripts/test: a virtual environment in .venv with requirements-dev.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BLANK_LOOP_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when requirements-dev.txt changed since the last install.
if ! cmp -s "$ROOT/requirements-dev.txt" "$VENV/.requirements-dev.txt"; then
    "$VENV/bin/python" -m pip install -qq --disable-pip-version-check -r "$ROOT/requirements-dev.txt"
    cp "$ROOT/requirements-dev.txt" "$VENV/.requirements-dev.txt"
fi
export PATH="$VENV/bin:$PATH"
