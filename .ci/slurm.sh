#!/usr/bin/env bash
# Slurm on this machine, for testing madflow's cluster path for real: one node, or several
# nodes on this one host (MADFLOW_SLURM_NODES=2: one slurmd per node, each started with
# `slurmd -N <node>` on its own port; Debian's slurm-wlm 22.05 runs them so).
#
#   bash .ci/slurm.sh start    # install (if missing), configure, start munged/slurmctld/slurmd
#   bash .ci/slurm.sh status   # show daemons, sinfo, squeue
#   bash .ci/slurm.sh stop     # kill the daemons (idempotent)
#
# Needs root (Debian/Ubuntu: apt-get installs slurm-wlm and munge when missing). Started by
# hand, no systemd, no cgroups, no accounting (slurmdbd): `sacct` does not work here, so
# Snakemake must use `--slurm-status-command squeue` (see slurm/config.yaml).
#
# Environment:
#   MADFLOW_SLURM_DIR   state/spool/log directory (default /tmp/madflow-slurm)
#   MADFLOW_SLURM_NODES   nodes (default 1). The first is named after this host (a name that
#                         resolves: jobs use their first node as a rendezvous address), the
#                         others <host>-n2, ...; each declares every CPU and the memory of the
#                         machine (the nodes share them; enough for tests)
#   MADFLOW_SLURM_GPUS    fake GPUs per node (default 0): Gres=gpu:N backed by device files
#                         (mknod, NVIDIA's major 195) under $MADFLOW_SLURM_DIR/dev, so that jobs
#                         ask for GPUs as on a real cluster and get CUDA_VISIBLE_DEVICES; no CUDA
#   MADFLOW_SLURM_CTLD_PORT / MADFLOW_SLURM_D_PORT   ports (default 6817 / 6818, 6819, ... per node)
#   MADFLOW_SLURM_MEM_MARGIN_MB   memory kept back from the node (default max(1024, 10%))
#   MADFLOW_SLURM_TIMEOUT   seconds to wait for the node to become idle (default 60)
#
# Client commands (sbatch, squeue, sinfo) find the configuration through the
# /etc/slurm/slurm.conf symlink this script creates (only if that path is free or already
# ours); otherwise export SLURM_CONF="$MADFLOW_SLURM_DIR/etc/slurm.conf".
set -euo pipefail

BASE="${MADFLOW_SLURM_DIR:-/tmp/madflow-slurm}"
CONF="$BASE/etc/slurm.conf"
CTLD_PORT="${MADFLOW_SLURM_CTLD_PORT:-6817}"
D_PORT="${MADFLOW_SLURM_D_PORT:-6818}"
WAIT_S="${MADFLOW_SLURM_TIMEOUT:-60}"
N_NODES="${MADFLOW_SLURM_NODES:-1}"
N_GPUS="${MADFLOW_SLURM_GPUS:-0}"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCK_DIR=/run/munge
MUNGED_PID="$MUNGE_SOCK_DIR/munged.pid"
SYSTEM_CONF=/etc/slurm/slurm.conf
export SLURM_CONF="$CONF"

log() { echo "[slurm.sh] $*" >&2; }
die() {
  echo "[slurm.sh] ERROR: $*" >&2
  exit 1
}

pid_alive() { # pidfile
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_names() {
  local host i
  host="$(hostname -s)"
  echo "$host"
  for ((i = 2; i <= N_NODES; i++)); do echo "${host}-n${i}"; done
}

node_state() { # one state when every node is in it, else the distinct states
  timeout 10 sinfo -h -N -o '%T' 2>/dev/null | sort -u | paste -sd, - || true
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null 2>&1 || missing+=(slurm-wlm)
  command -v munged >/dev/null 2>&1 || missing+=(munge)
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq >"$BASE/log/apt.log" 2>&1 ||
    die "apt-get update failed (no network/mirror?): see $BASE/log/apt.log"
  timeout 600 apt-get install -y -qq --no-install-recommends slurm-wlm munge \
    >>"$BASE/log/apt.log" 2>&1 ||
    die "apt-get install slurm-wlm munge failed: see $BASE/log/apt.log"
  command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 ||
    die "slurm-wlm/munge installed but slurmctld/munged not on PATH"
}

start_munge() {
  if timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
    log "munged already running"
    return 0
  fi
  id munge >/dev/null 2>&1 || die "user 'munge' missing (broken munge package?)"
  mkdir -p /etc/munge "$MUNGE_SOCK_DIR" /var/lib/munge /var/log/munge
  if [[ ! -s "$MUNGE_KEY" ]]; then
    log "creating munge key $MUNGE_KEY"
    if command -v mungekey >/dev/null 2>&1; then
      timeout 10 mungekey --create --keyfile="$MUNGE_KEY" --force
    else
      dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
  fi
  chown munge:munge /etc/munge "$MUNGE_KEY" "$MUNGE_SOCK_DIR" /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0755 "$MUNGE_SOCK_DIR"
  chmod 0400 "$MUNGE_KEY"
  rm -f "$MUNGE_SOCK_DIR/munge.socket.2" "$MUNGE_SOCK_DIR/munge.socket.2.lock" 2>/dev/null || true
  timeout 10 runuser -u munge -- munged --pid-file="$MUNGED_PID" ||
    timeout 10 munged --force --pid-file="$MUNGED_PID" ||
    die "munged did not start (see /var/log/munge/munged.log)"
  local i
  for i in $(seq 1 50); do
    if timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  die "munged is not answering (see /var/log/munge/munged.log)"
}

write_conf() {
  local host cpus mem_kb mem_mb margin
  host="$(hostname -s)"
  cpus="$(nproc)"
  mem_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
  mem_mb=$((mem_kb / 1024))
  margin="${MADFLOW_SLURM_MEM_MARGIN_MB:-$((mem_mb / 10 > 1024 ? mem_mb / 10 : 1024))}"
  mem_mb=$((mem_mb - margin))
  ((mem_mb > 0)) || die "RealMemory would be $mem_mb MB (MemTotal ${mem_kb} kB, margin $margin MB)"
  cat >"$CONF" <<EOF
# Generated by .ci/slurm.sh: a test cluster of ${N_NODES} node(s) on one host. Do not edit; rerun start.
ClusterName=madflow
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${D_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1000
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
ReturnToService=2
InactiveLimit=0
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=${BASE}/state
SlurmdSpoolDir=${BASE}/spool/slurmd.%n
SlurmctldPidFile=${BASE}/run/slurmctld.pid
SlurmdPidFile=${BASE}/run/slurmd.%n.pid
SlurmctldLogFile=${BASE}/log/slurmctld.log
SlurmdLogFile=${BASE}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
  local node port="$D_PORT" gres="" minor=0 i
  if ((N_GPUS > 0)); then
    echo "GresTypes=gpu" >>"$CONF"
    gres=" Gres=gpu:${N_GPUS}"
    mkdir -p "$BASE/dev"
    : >"$BASE/etc/gres.conf"
  fi
  for node in $(node_names); do
    echo "NodeName=${node} NodeHostname=${host} NodeAddr=127.0.0.1 Port=${port} CPUs=${cpus} RealMemory=${mem_mb}${gres} State=UNKNOWN" >>"$CONF"
    port=$((port + 1))
    for ((i = 0; i < N_GPUS; i++)); do
      [[ -e "$BASE/dev/nvidia$minor" ]] || mknod "$BASE/dev/nvidia$minor" c 195 "$minor"
      echo "NodeName=${node} Name=gpu File=$BASE/dev/nvidia$minor" >>"$BASE/etc/gres.conf"
      minor=$((minor + 1))
    done
  done
  echo "PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
  log "wrote $CONF (nodes $(node_names | paste -sd' ' -): CPUs=${cpus} RealMemory=${mem_mb} GPUs=${N_GPUS} each)"
}

link_system_conf() {
  # Let plain `sbatch`/`squeue` (and jobs started without SLURM_CONF) find our config.
  mkdir -p "$(dirname "$SYSTEM_CONF")"
  if [[ -L "$SYSTEM_CONF" || ! -e "$SYSTEM_CONF" ]]; then
    ln -sfn "$CONF" "$SYSTEM_CONF"
  else
    log "WARNING: $SYSTEM_CONF exists and is not ours; export SLURM_CONF=$CONF for clients"
  fi
}

wait_idle() {
  local deadline=$((SECONDS + WAIT_S)) state=""
  while ((SECONDS < deadline)); do
    state="$(node_state)"
    case "$state" in
    idle | mixed | allocated | completing) return 0 ;; # every node in one of these
    esac
    sleep 0.5
  done
  log "node state after ${WAIT_S}s: '${state:-<no answer>}'"
  return 1
}

cmd_start() {
  [[ "$(id -u)" == 0 ]] || die "must run as root (starts munged, slurmctld, slurmd)"
  local t0=$SECONDS
  mkdir -p "$BASE"/{etc,state,spool,run,log}
  if pid_alive "$BASE/run/slurmctld.pid" && slurmds_alive; then
    if wait_idle; then
      log "already running: node $(node_state)"
      return 0
    fi
    die "daemons are running but the node is not usable; run 'bash .ci/slurm.sh stop' then start"
  fi
  install_packages
  # half-started leftovers from an earlier run (slurmctld -c below starts with a clean state)
  cmd_stop_slurm
  start_munge
  write_conf
  link_system_conf
  timeout 30 slurmctld -f "$CONF" -c ||
    die "slurmctld failed to start; log: $(tail -n 20 "$BASE/log/slurmctld.log" 2>/dev/null)"
  local node
  for node in $(node_names); do
    timeout 30 slurmd -f "$CONF" -N "$node" ||
      die "slurmd $node failed to start; log: $(tail -n 20 "$BASE/log/slurmd.$node.log" 2>/dev/null)"
  done
  if ! wait_idle; then
    echo "--- slurmctld.log" >&2
    tail -n 20 "$BASE/log/slurmctld.log" >&2 2>/dev/null || true
    echo "--- slurmd logs" >&2
    tail -n 20 "$BASE"/log/slurmd.*.log >&2 2>/dev/null || true
    die "the nodes did not become idle within ${WAIT_S}s"
  fi
  log "started in $((SECONDS - t0)) s: node $(node_state) (SLURM_CONF=$CONF)"
}

kill_pidfile() { # pidfile name
  local f="$1" name="$2" pid i
  [[ -s "$f" ]] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name ($pid) ignored SIGTERM; SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
}

slurmds_alive() { # every configured node's slurmd
  local node
  for node in $(node_names); do
    pid_alive "$BASE/run/slurmd.$node.pid" || return 1
  done
}

cmd_stop_slurm() {
  local f
  for f in "$BASE"/run/slurmd.*.pid "$BASE/run/slurmd.pid"; do
    [[ -e "$f" ]] && kill_pidfile "$f" "$(basename "$f" .pid)"
  done
  kill_pidfile "$BASE/run/slurmctld.pid" slurmctld
}

cmd_stop() {
  cmd_stop_slurm
  kill_pidfile "$MUNGED_PID" munged
  log "stopped"
}

cmd_status() {
  local rc=0 d
  for d in "$MUNGED_PID" "$BASE/run/slurmctld.pid" "$BASE"/run/slurmd.*.pid; do
    if pid_alive "$d"; then
      echo "$(basename "$d" .pid): running (pid $(cat "$d"))"
    else
      echo "$(basename "$d" .pid): not running"
      rc=1
    fi
  done
  if ((rc == 0)); then
    timeout 10 sinfo || rc=1
    timeout 10 squeue --states=all || true
  fi
  return "$rc"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
  echo "usage: $0 start|stop|status" >&2
  exit 2
  ;;
esac
