#!/usr/bin/env bash
# A one-node Slurm on this machine, to try hydra/launcher=slurm without a cluster (and what
# the `slurm` tests run against). Needs root and Debian's packages:
#   apt-get install --no-install-recommends slurm-wlm munge
#
#   bash scripts/local_slurm.sh start     # munged, slurmctld, slurmd; prints the SLURM_CONF to export
#   bash scripts/local_slurm.sh status
#   bash scripts/local_slurm.sh stop      # stops the daemons it started, by their PIDs
#
# One node `localhost` with this machine's CPUs and memory (minus 2 GB), one default
# partition `local`, no GPU, no cgroups, accounting off (as on a fresh Slurm install). The
# daemons run in the foreground of background processes (no systemd needed); their
# config, state, logs and PIDs live in $AISP_SLURM_DIR (default /tmp/aisp-slurm).
set -euo pipefail
DIR=${AISP_SLURM_DIR:-/tmp/aisp-slurm}
CONF="$DIR/slurm.conf"
DAEMONS=(slurmd slurmctld munged)  # stopped in this order

pid_of() { [ -f "$DIR/$1.pid" ] && cat "$DIR/$1.pid"; }
alive() { local p; p=$(pid_of "$1") && [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 2048 ))
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
  chmod 0755 "$DIR"  # munged (user munge) keeps its seed there
  cat > "$CONF" <<EOF
ClusterName=aisp-local
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=${AISP_SLURMCTLD_PORT:-6817}
SlurmdPort=${AISP_SLURMD_PORT:-6818}
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
KillWait=30
MinJobAge=300
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  [ "$(id -u)" = 0 ] || { echo "error: local_slurm.sh start needs root (slurmd starts jobs as their users)" >&2; exit 2; }
  for cmd in munged slurmctld slurmd sinfo; do
    command -v "$cmd" >/dev/null || { echo "error: $cmd not found: apt-get install --no-install-recommends slurm-wlm munge" >&2; exit 2; }
  done
  if alive slurmctld; then echo "already running (SLURM_CONF=$CONF)"; return; fi
  write_conf
  export SLURM_CONF="$CONF"
  install -d -o munge -g munge -m 0755 /run/munge
  chown munge:munge "$DIR/munge"
  setpriv --reuid=munge --regid=munge --clear-groups munged -F --socket=/run/munge/munge.socket.2 \
    --log-file="$DIR/munge/munged.log" --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed" \
    > "$DIR/munged.out" 2>&1 &
  echo $! > "$DIR/munged.pid"
  for _ in $(seq 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done
  slurmctld -D -i -f "$CONF" > "$DIR/slurmctld.out" 2>&1 &
  echo $! > "$DIR/slurmctld.pid"
  slurmd -D -N localhost -f "$CONF" > "$DIR/slurmd.out" 2>&1 &
  echo $! > "$DIR/slurmd.pid"
  local deadline=$((SECONDS + 60)) d
  while [ $SECONDS -lt $deadline ]; do  # the node is idle once slurmd has registered
    if timeout 10 sinfo -h -o %t 2>/dev/null | grep -qx idle; then
      echo "local Slurm is up: export SLURM_CONF=$CONF"
      return
    fi
    for d in munged slurmctld slurmd; do alive "$d" || { fail "$d ended"; }; done
    sleep 0.2
  done
  fail "the local Slurm did not come up in 60 s"
}

fail() {
  echo "error: $1; logs in $DIR (*.out, *.log)" >&2
  tail -n 3 "$DIR"/*.out >&2 || true
  stop
  exit 1
}

stop() {
  local d p
  for d in "${DAEMONS[@]}"; do
    p=$(pid_of "$d") || continue
    if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
      kill -TERM "$p" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$p" 2>/dev/null || true
    fi
    rm -f "$DIR/$d.pid"
  done
}

status() {
  local d
  for d in munged slurmctld slurmd; do
    if alive "$d"; then echo "$d: running (pid $(pid_of "$d"))"; else echo "$d: stopped"; fi
  done
  if alive slurmctld; then SLURM_CONF="$CONF" sinfo; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
