#!/usr/bin/env bash
# bootstrap.sh — create .venv (Python >= 3.11) and install apbatch with its test extras.
# Idempotent: reinstalls only when setup.cfg/pyproject.toml changed since the last install.
# Usage: scripts/bootstrap.sh            (prints the venv's bin directory on the last line)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${APBATCH_VENV:-$here/.venv}"
py="${PYTHON:-python3}"
"$py" - <<'PY' || { echo "bootstrap: Python >= 3.11 is required (set PYTHON=...)" >&2; exit 2; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
stamp="$venv/.apbatch-installed"
want="$(cat "$here/setup.cfg" "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log="$venv/install.log"
  echo "bootstrap: installing apbatch and its dependencies into $venv (log: $log)" >&2
  if ! { "$venv/bin/python" -m pip install --upgrade pip && "$venv/bin/python" -m pip install -e "$here[test]"; } \
      > "$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "bootstrap: pip install failed; see $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
echo "$venv/bin"
