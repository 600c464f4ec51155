#!/usr/bin/env bash
# slurm-local.sh — a real single-node Slurm cluster (Debian's Slurm 22.05) on 127.0.0.1,
# with no systemd, no cgroups, everything under one state directory.
#
# apbatch's copy of the shared recipe: the Slurm tests (tests/fixtures_slurm.py), CI and
# bench/bench_submit.py start the cluster with it. Point apbatch at it with
#   eval "$(scripts/slurm-local.sh env)"   and, in the config,
#   backend: {kind: slurm, jobcomp_log: /tmp/apbatch-slurm/log/jobcomp.txt}
# (accounting is off by default, so finished jobs are read back from the jobcomp log).
#
# Usage (as root):
#   slurm-local.sh install   # idempotent: apt-get install the Debian packages (runs apt-get update
#                            # only if the install fails, e.g. on a machine with empty apt lists)
#   slurm-local.sh start     # install if needed, write a fresh config, start the daemons, wait
#                            # until the node is idle; prints 'export SLURM_CONF=...'
#   slurm-local.sh status    # recorded daemons, sinfo, squeue; exit 1 if a daemon is not running
#   slurm-local.sh env       # print 'export SLURM_CONF=...'  (use: eval "$(slurm-local.sh env)")
#   slurm-local.sh stop      # cancel all jobs, then stop ONLY the PIDs recorded in the state dir
#
# Client commands (sbatch, squeue, scontrol, scancel, sinfo, sacct) need SLURM_CONF; without it
# they fail with "fetch_config: DNS SRV lookup failed ... Could not establish a configuration source".
#
# State directory $SLURM_LOCAL_DIR (default /tmp/apbatch-slurm); 'start' wipes and recreates:
#   etc/slurm.conf  etc/slurmdbd.conf  munge/ (key, 0700)  munge-run/ (socket, 0755)
#   spool/  log/ (daemon logs, jobcomp.txt)  run/*.pid (PIDs recorded by this script)  mysql/
#
# Environment:
#   SLURM_LOCAL_DIR          state dir                                  (default /tmp/apbatch-slurm)
#   SLURM_LOCAL_CPUS         CPUs the node advertises (default 64). Deliberately more than the real
#                            cores (SlurmdParameters=config_overrides) so many 1-CPU jobs run at once;
#                            set it to $(nproc) for an honest node.
#   SLURM_LOCAL_MEM_MB       RealMemory advertised, MB (default 65536). Memory is not a consumable
#                            resource (CR_Core); this only bounds what --mem may ask for.
#   SLURM_LOCAL_PARTITION    partition name                             (default debug)
#   SLURM_LOCAL_CTLD_PORT    slurmctld port                             (default 6817)
#   SLURM_LOCAL_SLURMD_PORT  slurmd port                                (default 6818)
#   SLURM_LOCAL_CRED_EXPIRE  seconds; also how long a requeued job waits before it may start
#                            again (default 10; Slurm's default is 120)
#   SLURM_LOCAL_MIN_JOB_AGE  seconds a finished job stays visible to squeue -t all / scontrol
#                            (default 300)
#   SLURM_LOCAL_ACCOUNTING   0 (default): no accounting; sacct says "Slurm accounting storage is
#                            disabled" and exits 1; finished jobs are logged one line each to
#                            log/jobcomp.txt (jobcomp/filetxt).
#                            1: also install and run MariaDB + slurmdbd so that sacct works
#                            (~190 MB more packages, start takes a few seconds longer).
#   SLURM_LOCAL_DBD_PORT     slurmdbd port (accounting mode)            (default 6819)
#   SLURM_LOCAL_DB_PORT      MariaDB port on 127.0.0.1 (accounting mode) (default 3307)
#   SLURM_LOCAL_START_TIMEOUT seconds to wait for each daemon           (default 60)
#
# All daemons listen on 127.0.0.1 only.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/apbatch-slurm}"
CPUS="${SLURM_LOCAL_CPUS:-64}"
MEM_MB="${SLURM_LOCAL_MEM_MB:-65536}"
PARTITION="${SLURM_LOCAL_PARTITION:-debug}"
CTLD_PORT="${SLURM_LOCAL_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_LOCAL_SLURMD_PORT:-6818}"
DBD_PORT="${SLURM_LOCAL_DBD_PORT:-6819}"
DB_PORT="${SLURM_LOCAL_DB_PORT:-3307}"
CRED_EXPIRE="${SLURM_LOCAL_CRED_EXPIRE:-10}"
MIN_JOB_AGE="${SLURM_LOCAL_MIN_JOB_AGE:-300}"
ACCOUNTING="${SLURM_LOCAL_ACCOUNTING:-0}"
START_TIMEOUT="${SLURM_LOCAL_START_TIMEOUT:-60}"
NODE=localhost
CLUSTER=local
CONF="$DIR/etc/slurm.conf"
MUNGE_SOCK="$DIR/munge-run/munge.sock"
DB_SOCK="$DIR/mysql/mysqld.sock"
DB_PASS=slurm-local
ALL_DAEMONS_STOP_ORDER=(slurmd slurmctld slurmdbd mariadbd munged)
if [ "$ACCOUNTING" = 1 ]; then
  DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
else
  DAEMONS=(munged slurmctld slurmd)
fi

log() { printf '[slurm-local] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }
case "$DIR" in /*) ;; *) die "SLURM_LOCAL_DIR must be an absolute path" ;; esac
[ "$DIR" != / ] || die "SLURM_LOCAL_DIR must not be /"
export PATH="$PATH:/usr/sbin:/sbin"

# ---------------------------------------------------------------- install
have_binaries() {
  local b
  for b in munged mungekey slurmctld slurmd slurmstepd sbatch squeue scontrol scancel sinfo; do
    command -v "$b" >/dev/null 2>&1 || return 1
  done
  ls /usr/lib/*/slurm-wlm/select_cons_tres.so >/dev/null 2>&1 || return 1
  if [ "$ACCOUNTING" = 1 ]; then
    for b in slurmdbd sacct sacctmgr mariadbd mariadb mariadb-install-db; do
      command -v "$b" >/dev/null 2>&1 || return 1
    done
  fi
}

cmd_install() {
  need_root
  if have_binaries; then log "packages already installed"; return 0; fi
  local pkgs=(slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge)
  [ "$ACCOUNTING" = 1 ] && pkgs+=(slurmdbd mariadb-server)
  # The packages' postinst scripts try to start munge/slurmd/slurmctld(/mariadb) through
  # invoke-rc.d. Deny that with the standard policy-rc.d trick unless a policy already exists.
  local made_policy=0 rc=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "${pkgs[@]}"; then
    log "apt-get install failed; running apt-get update once and retrying"
    { apt-get update && apt-get install -y --no-install-recommends "${pkgs[@]}"; } || rc=$?
  fi
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  [ "$rc" = 0 ] || die "apt-get install failed (rc=$rc)"
  have_binaries || die "packages installed but binaries/plugins missing"
}

# ---------------------------------------------------------------- pid bookkeeping
pidfile() { echo "$DIR/run/$1.pid"; }

# alive NAME: print the recorded pid if that process exists, is not a zombie, and its executable
# is NAME (guards against a recycled pid)
alive() {
  local f pid exe
  f="$(pidfile "$1")"
  [ -s "$f" ] || return 1
  pid="$(cat "$f")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
  case "$exe" in
    */"$1"|*/"$1-wlm"|*/"$1 (deleted)"|*/"$1-wlm (deleted)") ;;  # Debian: slurmd -> slurmd-wlm
    *) return 1 ;;
  esac
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
  echo "$pid"
}

# launch NAME CMD ARGS... : run a daemon in its foreground mode, detached (own session, stdio to
# log/NAME.out), and record its pid in run/NAME.pid
launch() {
  local name="$1"; shift
  setsid "$@" </dev/null >"$DIR/log/$name.out" 2>&1 &
  local pid=$!
  echo "$pid" > "$(pidfile "$name")"
  # $! is first a copy of this shell, then setsid, then (same pid, no fork) the daemon:
  # wait for that exec so that alive() can check the pid's identity
  for _ in $(seq 1 100); do
    alive "$name" >/dev/null && return 0
    [ -d "/proc/$pid" ] || break
    sleep 0.05
  done
  # setsid forks when it is a process-group leader (job control on): take the pid the daemon
  # wrote itself
  sleep 0.5
  if [ -s "$DIR/run/$name.daemon.pid" ]; then
    cp "$DIR/run/$name.daemon.pid" "$(pidfile "$name")"
    alive "$name" >/dev/null && return 0
  fi
  echo "$pid" > "$(pidfile "$name")"   # died, or never became NAME: the caller reports it
}

# wait_for SECONDS DESCRIPTION COMMAND...   (with DAEMON=name set: give up as soon as it dies)
wait_for() {
  local t="$1" what="$2"; shift 2
  local t0; t0="$(now)"
  while ! "$@" >/dev/null 2>&1; do
    if [ -n "${DAEMON:-}" ] && ! alive "$DAEMON" >/dev/null; then
      log "$DAEMON exited; last lines of $DIR/log/$DAEMON.out:"
      tail -8 "$DIR/log/$DAEMON.out" >&2 || true
      return 1
    fi
    if awk -v a="$t0" -v b="$(now)" -v t="$t" 'BEGIN{exit !(b-a>t)}'; then
      log "timed out after ${t}s waiting for: $what"
      return 1
    fi
    sleep 0.1
  done
  log "$what after $(elapsed "$t0")s"
}

port_listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
node_idle() { sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -qx 'idle'; }

# ---------------------------------------------------------------- config
write_config() {
  mkdir -p "$DIR"/{etc,log,run,spool/ctld,spool/d,munge,munge-run}
  chmod 700 "$DIR/munge"       # key dir: private
  chmod 755 "$DIR/munge-run"   # socket dir: munged insists on execute permission for all
  local acct
  if [ "$ACCOUNTING" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# slurmctld reaches slurmdbd through munge; AuthInfo does not apply to that link
AccountingStoragePass=$MUNGE_SOCK
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux"
  else
    acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi
  cat > "$CONF" <<EOF
# generated by slurm-local.sh: one node on 127.0.0.1, no systemd, no cgroups
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$CRED_EXPIRE
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.daemon.pid
SlurmdPidFile=$DIR/run/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
$acct
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
OverTimeLimit=0
MinJobAge=$MIN_JOB_AGE
NodeName=$NODE NodeHostname=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  if [ "$ACCOUNTING" = 1 ]; then
    cat > "$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.daemon.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"   # slurmdbd refuses a readable one
  fi
  if [ ! -s "$DIR/munge/munge.key" ]; then
    mungekey --create --keyfile="$DIR/munge/munge.key" --force 2>/dev/null \
      || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$DIR/munge/munge.key"
  fi
}

start_accounting() {
  mkdir -p "$DIR/mysql"
  mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql/data" \
    --auth-root-authentication-method=normal --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 \
    || { tail -20 "$DIR/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  launch mariadbd mariadbd --no-defaults --user=root --datadir="$DIR/mysql/data" \
    --socket="$DB_SOCK" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --pid-file="$DIR/run/mariadbd.daemon.pid" --log-error="$DIR/log/mariadbd.err" \
    --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900
  DAEMON=mariadbd wait_for "$START_TIMEOUT" "mariadbd ready" test -S "$DB_SOCK" \
    || { cat "$DIR/log/mariadbd.err" >&2 || true; cmd_stop; die "mariadbd did not start (port $DB_PORT busy?)"; }
  mariadb --no-defaults -S "$DB_SOCK" -u root -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" \
    || { cmd_stop; die "could not create the accounting database"; }
  launch slurmdbd slurmdbd -D
  DAEMON=slurmdbd wait_for "$START_TIMEOUT" "slurmdbd listening" port_listening "$DBD_PORT" \
    || { cmd_stop; die "slurmdbd did not start (port $DBD_PORT busy? see $DIR/log/slurmdbd.out)"; }
  sacctmgr -i add cluster "$CLUSTER" >/dev/null \
    || { cmd_stop; die "sacctmgr add cluster failed"; }
}

# ---------------------------------------------------------------- commands
cmd_start() {
  need_root
  local n running=0
  for n in "${DAEMONS[@]}"; do alive "$n" >/dev/null && running=$((running+1)); done
  if [ "$running" = "${#DAEMONS[@]}" ]; then log "already running in $DIR"; cmd_env; return 0; fi
  if [ "$running" != 0 ]; then log "partly running; stopping first"; cmd_stop; fi
  cmd_install
  # a fresh cluster every start: wipe only what this script creates
  rm -rf "${DIR:?}"/{etc,log,run,spool,munge-run,mysql}
  write_config
  export SLURM_CONF="$CONF"
  local t0; t0="$(now)"

  launch munged munged -F --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCK" \
    --pid-file="$DIR/run/munged.daemon.pid" --seed-file="$DIR/munge/munged.seed" \
    --log-file="$DIR/log/munged.log"
  DAEMON=munged wait_for 10 "munged ready" test -S "$MUNGE_SOCK" \
    || { cmd_stop; die "munged did not start (see $DIR/log/munged.out)"; }

  if [ "$ACCOUNTING" = 1 ]; then start_accounting; fi

  launch slurmctld slurmctld -D -i -f "$CONF"
  # sbatch/squeue work from here on; jobs stay PENDING until slurmd has registered
  DAEMON=slurmctld wait_for "$START_TIMEOUT" "slurmctld answering" scontrol ping \
    || { cmd_stop; die "slurmctld did not start (port $CTLD_PORT busy? see $DIR/log/slurmctld.out)"; }

  launch slurmd slurmd -D -N "$NODE" -f "$CONF"
  if ! DAEMON=slurmd wait_for "$START_TIMEOUT" "node $NODE idle" node_idle; then
    sinfo -N -l >&2 || true
    cmd_stop; die "node did not become idle (port $SLURMD_PORT busy? see $DIR/log/slurmd.out)"
  fi
  for n in "${DAEMONS[@]}"; do alive "$n" >/dev/null || { cmd_stop; die "$n died; see $DIR/log/$n.out"; }; done
  log "cluster up in $(elapsed "$t0")s: $(sinfo -h -o '%P %D %c %T')"
  cmd_env
}

cmd_env() { echo "export SLURM_CONF=$CONF"; }

cmd_status() {
  local n pid rc=0
  for n in "${DAEMONS[@]}"; do
    if pid="$(alive "$n")"; then echo "$n running pid=$pid"; else echo "$n not running"; rc=1; fi
  done
  if alive slurmctld >/dev/null; then
    export SLURM_CONF="$CONF"
    sinfo -N -o '%N %T %c %m %E' || true
    squeue -o '%.18i %.12P %.24j %.2t %.10M %.10l %R' || true
  fi
  return "$rc"
}

cmd_stop() {
  need_root
  export SLURM_CONF="$CONF"
  # 1) cancel every job of this cluster so that no slurmstepd outlives slurmd
  if alive slurmctld >/dev/null; then
    local ids
    ids="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)"
    if [ -n "${ids// }" ]; then
      log "cancelling jobs: $ids"
      # shellcheck disable=SC2086
      scancel $ids 2>/dev/null || true
      # shellcheck disable=SC2016
      wait_for 20 "jobs gone" bash -c '[ -z "$(squeue -h -o %i 2>/dev/null)" ]' \
        || log "warning: some jobs still listed after 20s"
    fi
    # a finished job's slurmstepd lingers a moment after squeue drops it: wait, never kill
    wait_for 10 "job steps exited" bash -c '! pgrep -x slurmstepd' || true
  fi
  # 2) stop only the daemons whose pids this script recorded
  local n pid
  for n in "${ALL_DAEMONS_STOP_ORDER[@]}"; do
    if pid="$(alive "$n")"; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 150); do alive "$n" >/dev/null || break; sleep 0.1; done
      if alive "$n" >/dev/null; then
        log "$n ($pid) ignored SIGTERM for 15s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
      fi
      log "stopped $n (pid $pid)"
    fi
    rm -f "$(pidfile "$n")"
  done
  # 3) report (never kill) job steps that are still there
  local left
  left="$(pgrep -x slurmstepd 2>/dev/null | tr '\n' ' ' || true)"
  if [ -n "${left// }" ]; then log "note: slurmstepd processes still present: $left(not touched)"; fi
}

case "${1:-}" in
  install) cmd_install ;;
  start)   cmd_start ;;
  stop)    cmd_stop ;;
  status)  cmd_status ;;
  env)     cmd_env ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
