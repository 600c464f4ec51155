#!/usr/bin/env bash
# bootstrap.sh — create .venv (Python >= 3.12) and install apbatch with its test extras.
# Idempotent: reinstalls only when setup.cfg/pyproject.toml/requirements-nodeps.txt changed since the
# last install. requirements-nodeps.txt: packages installed without their declared dependencies (why: there).
# Python: $PYTHON if set, else the first of python3.12/python3/python3.13 on PATH that is >= 3.12,
# else a pyenv-installed 3.12 (then 3.13): $(pyenv root)/versions/3.12.*/bin/python. 3.12 is the tested one.
# Usage: scripts/bootstrap.sh            (prints the venv's bin directory on the last line)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${APBATCH_VENV:-$here/.venv}"

ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  if [ -n "${PYTHON:-}" ]; then
    ok "$PYTHON" && { echo "$PYTHON"; return 0; }
    echo "bootstrap: PYTHON=$PYTHON is not a Python >= 3.12" >&2; return 1
  fi
  local c
  for c in python3.12 python3 python3.13; do
    if command -v "$c" >/dev/null 2>&1 && ok "$c"; then command -v "$c"; return 0; fi
  done
  local root
  root="$( (pyenv root) 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
  for c in $(ls -d "$root"/versions/3.12.* 2>/dev/null | sort -rV) $(ls -d "$root"/versions/3.13.* 2>/dev/null | sort -rV); do
    if [ -x "$c/bin/python" ] && ok "$c/bin/python"; then echo "$c/bin/python"; return 0; fi
  done
  return 1
}

if [ -x "$venv/bin/python" ] && ! ok "$venv/bin/python"; then
  echo "bootstrap: $venv has Python < 3.12; recreating it" >&2
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  py="$(find_python)" || {
    echo "bootstrap: Python >= 3.12 is required (lsst-images needs it) and none was found on PATH or in pyenv;" \
         "install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12" >&2
    exit 2
  }
  echo "bootstrap: creating $venv with $py" >&2
  "$py" -m venv "$venv"
fi
stamp="$venv/.apbatch-installed"
want="$(cat "$here/setup.cfg" "$here/pyproject.toml" "$here/requirements-nodeps.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log="$venv/install.log"
  echo "bootstrap: installing apbatch and its dependencies into $venv (log: $log)" >&2
  if ! { "$venv/bin/python" -m pip install --upgrade pip && "$venv/bin/python" -m pip install -e "$here[test]" \
         && "$venv/bin/python" -m pip install --no-deps -r "$here/requirements-nodeps.txt"; } \
      > "$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "bootstrap: pip install failed; see $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
echo "$venv/bin"
