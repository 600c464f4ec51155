#!/usr/bin/env bash
# run-demo.sh — the README's first command: a simulated night end to end on the embedded
# defaults (local process-pool backend, SQLite butler/APDB/ledger, alerts to Avro files).
# Everything goes under ./demo-night (or $1); extra arguments go to `apbatch demo`.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
out="${1:-demo-night}"
shift || true
bin="$(scripts/bootstrap.sh | tail -n 1)"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
if [ -e "$out" ]; then
  echo "run-demo: $out exists; remove it or pass another directory: bash scripts/run-demo.sh DIR" >&2
  exit 2
fi
exec "$bin/python" -m apbatch demo --out "$out" "$@"
