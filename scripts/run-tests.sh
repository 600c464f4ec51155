#!/usr/bin/env bash
# run-tests.sh — install what the tests need and run them (the README's test command; CI runs it).
# Real services: the tests start Slurm (scripts/slurm-local.sh, needs root + Debian packages)
# and a Kafka-protocol broker (scripts/kafka-local.sh) themselves and stop them at the end.
# Extra arguments go to pytest, e.g. scripts/run-tests.sh tests/test_slurm.py -x
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
bin="$(scripts/bootstrap.sh | tail -n 1)"
export PATH="$bin:$here/bin:$PATH"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
# Install the batch system's and PostgreSQL's packages up front (idempotent) so that the first test does not wait on apt.
if [ "$(id -u)" = 0 ]; then scripts/slurm-local.sh install >&2 || echo "run-tests: Slurm install failed" >&2; fi
if [ "$(id -u)" = 0 ]; then scripts/chromium-local.sh install >&2 || echo "run-tests: Chromium install failed" >&2; fi
if [ "$(id -u)" = 0 ]; then scripts/postgres-local.sh install >&2 || echo "run-tests: PostgreSQL install failed" >&2; fi
set +e
"$bin/python" -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "run-tests: pytest collected no tests — treating as a failure" >&2
  exit 1
fi
exit "$rc"
