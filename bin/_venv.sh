# Sourced by bin/demo, bin/test and bin/bench: use the active virtualenv, or create .venv, and
# install the package into it with the extras named in ETL_EXTRAS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    PY="$(command -v python3.11 || command -v python3)"
    "$PY" -m venv "$ROOT/.venv"
    "$ROOT/.venv/bin/python" -m pip install -q --upgrade pip
  fi
  VIRTUAL_ENV="$ROOT/.venv"
fi
PYTHON="$VIRTUAL_ENV/bin/python"
"$PYTHON" -m pip install -q --disable-pip-version-check -e "$ROOT${ETL_EXTRAS:+[$ETL_EXTRAS]}"
export PATH="$VIRTUAL_ENV/bin:$PATH"
