#!/usr/bin/env bash
# postgres-local.sh — a throw-away PostgreSQL server on 127.0.0.1 for apbatch's scale tier and its
# tests (ledger, butler registry and APDB on PostgreSQL instead of SQLite). No systemd: the
# cluster lives in a state directory of its own, owned by the 'postgres' user when run as root
# (PostgreSQL refuses to run as root), and listens on 127.0.0.1 only.
#
# Usage:
#   postgres-local.sh install   # apt-get install postgresql postgresql-contrib if no server is found, and
#                               # postgresql-N-pgsphere if pg_sphere is missing (root)
#   postgres-local.sh start     # install if needed, initdb, start, wait; create database 'apbatch'
#                               # with btree_gist (the butler registry needs it); prints
#                               # 'export APBATCH_PG_URL=postgresql+psycopg2://apbatch@127.0.0.1:PORT/apbatch'
#   postgres-local.sh stop      # fast shutdown of THIS state dir's server
#   postgres-local.sh status    # exit 0 if it accepts connections
#   postgres-local.sh env       # print the export line
#
# Environment:
#   PG_LOCAL_DIR    state dir: data/, postgres.log, socket      (default /tmp/apbatch-postgres)
#   PG_LOCAL_PORT   port on 127.0.0.1                           (default 15432, clear of a real 5432)
#   PG_LOCAL_START_TIMEOUT  seconds to wait for the server      (default 60)
#
# Authentication is 'trust' for 127.0.0.1 and the socket: a test server, never for production.
set -euo pipefail

DIR="${PG_LOCAL_DIR:-/tmp/apbatch-postgres}"
PORT="${PG_LOCAL_PORT:-15432}"
TIMEOUT="${PG_LOCAL_START_TIMEOUT:-60}"
DATA="$DIR/data"
LOG="$DIR/postgres.log"
USER_NAME=apbatch
DB=apbatch

die() { echo "postgres-local: $*" >&2; exit 1; }

bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

install() {
  if bindir >/dev/null; then return 0; fi
  [ "$(id -u)" = 0 ] || die "no PostgreSQL server found and not root: apt-get install postgresql postgresql-contrib"
  echo "postgres-local: installing postgresql (apt)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql postgresql-contrib >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql postgresql-contrib >&2; } \
    || die "apt-get install postgresql failed"
  bindir >/dev/null || die "postgresql installed but no initdb found under /usr/lib/postgresql"
}

# pg_sphere (spherical types and indexes): TAP's ADQL geometry (CONTAINS/POINT/CIRCLE) becomes
# pg_sphere SQL, and ObsCore's s_region is an spoly. Debian packages it per server version.
install_pgsphere() {
  local bin major; bin="$(bindir)" || return 0
  major="$(basename "$(dirname "$bin")")"
  [ -f "/usr/share/postgresql/$major/extension/pg_sphere.control" ] && return 0
  [ "$(id -u)" = 0 ] || { echo "postgres-local: pg_sphere missing and not root: apt-get install postgresql-$major-pgsphere" >&2; return 0; }
  echo "postgres-local: installing postgresql-$major-pgsphere (apt)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "postgresql-$major-pgsphere" >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "postgresql-$major-pgsphere" >&2; } \
    || echo "postgres-local: apt-get install postgresql-$major-pgsphere failed (TAP geometry and ObsCore need it)" >&2
}

# Run a server binary as the cluster's owner (postgres when we are root).
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

url() { echo "postgresql+psycopg2://$USER_NAME@127.0.0.1:$PORT/$DB"; }

ready() { "$(bindir)/pg_isready" -q -h 127.0.0.1 -p "$PORT" >/dev/null 2>&1; }

start() {
  install
  install_pgsphere
  local bin; bin="$(bindir)"
  mkdir -p "$DIR"
  [ "$(id -u)" = 0 ] && chown postgres: "$DIR"
  if [ ! -f "$DATA/PG_VERSION" ]; then
    as_owner "$bin/initdb" -D "$DATA" -U "$USER_NAME" -A trust -E UTF8 --no-instructions >"$DIR/initdb.log" 2>&1 \
      || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
  fi
  if ready; then
    echo "postgres-local: already running on 127.0.0.1:$PORT" >&2
  else
    as_owner "$bin/pg_ctl" -D "$DATA" -l "$LOG" -w -t "$TIMEOUT" \
      -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c full_page_writes=off" start >&2 \
      || { tail -n 20 "$LOG" >&2 || true; die "server did not start (log: $LOG)"; }
  fi
  local psql=("$bin/psql" -h 127.0.0.1 -p "$PORT" -U "$USER_NAME" -v ON_ERROR_STOP=1 -q)
  if ! "${psql[@]}" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
    "${psql[@]}" -d postgres -c "CREATE DATABASE $DB" >&2
  fi
  # the registry's timespan exclusion constraints need btree_gist; template1 gets it too, so
  # every database the tests create has it
  "${psql[@]}" -d "$DB" -c "CREATE EXTENSION IF NOT EXISTS btree_gist" >&2
  "${psql[@]}" -d template1 -c "CREATE EXTENSION IF NOT EXISTS btree_gist" >&2
  # pg_sphere likewise, where installed (the PPDB's TAP service and ObsCore table need it)
  if [ -f "/usr/share/postgresql/$(basename "$(dirname "$bin")")/extension/pg_sphere.control" ]; then
    "${psql[@]}" -d "$DB" -c "CREATE EXTENSION IF NOT EXISTS pg_sphere" >&2
    "${psql[@]}" -d template1 -c "CREATE EXTENSION IF NOT EXISTS pg_sphere" >&2
  fi
  echo "export APBATCH_PG_URL=$(url)"
}

stop() {
  local bin; bin="$(bindir)" || die "no PostgreSQL server installed"
  [ -f "$DATA/postmaster.pid" ] || { echo "postgres-local: not running" >&2; return 0; }
  as_owner "$bin/pg_ctl" -D "$DATA" -m fast -w stop >&2 || die "pg_ctl stop failed"
}

case "${1:-}" in
  install) install; install_pgsphere ;;
  start) start ;;
  stop) stop ;;
  status) ready ;;
  env) echo "export APBATCH_PG_URL=$(url)" ;;
  *) die "usage: postgres-local.sh install|start|stop|status|env" ;;
esac
