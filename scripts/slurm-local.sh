#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for testing the Slurm profile (as root).
#
#   bash scripts/slurm-local.sh install   # apt-get install slurmctld slurmd slurm-client munge (skips if present)
#   bash scripts/slurm-local.sh up        # write the config, start munged + slurmctld + slurmd, wait for the node
#   bash scripts/slurm-local.sh status    # daemons (pid files) and sinfo
#   bash scripts/slurm-local.sh down      # stop the daemons by their pid files, remove /etc/slurm/slurm.conf
#
# Everything lives under $LLMRET_SLURM_DIR (default /tmp/llmret-slurm): slurm.conf, gres.conf,
# the munge key and socket, controller state, spool, logs and pid files. Clients find the
# cluster through /etc/slurm/slurm.conf, a link to that slurm.conf made by `up` (the
# executor plugin's job step drops SLURM_CONF before its inner srun, so the default path
# must work); `up` refuses to replace an /etc/slurm/slurm.conf it did not make, except a
# link left by a test cluster of this script whose daemons are all gone.
#
# The node (the machine's short hostname) offers LLMRET_SLURM_CPUS CPUs (default 16),
# LLMRET_SLURM_MEM_MB memory (default 256000) and LLMRET_SLURM_GPUS fake GPUs (default 2:
# character devices that are copies of /dev/null, declared in gres.conf with
# AutoDetect=off) whatever the hardware has (SlurmdParameters=config_overrides), so the
# profile's per-GPU CPU and memory requests schedule on a small machine; nothing is
# enforced (proctrack/linuxproc, task/none, no cgroups). Limit concurrency with
# `snakemake --jobs`. No slurmdbd: run Snakemake with `--slurm-status-command squeue`
# (MinJobAge=300 keeps finished jobs visible to squeue long enough).
set -euo pipefail

STATE=${LLMRET_SLURM_DIR:-/tmp/llmret-slurm}
CPUS=${LLMRET_SLURM_CPUS:-16}
MEM_MB=${LLMRET_SLURM_MEM_MB:-256000}
GPUS=${LLMRET_SLURM_GPUS:-2}
CTLD_PORT=${LLMRET_SLURM_PORT:-6817}
MIN_JOB_AGE=${LLMRET_SLURM_MIN_JOB_AGE:-300}
ETC_CONF=/etc/slurm/slurm.conf
# First line of every config it writes (how `up` knows a link left by an earlier test cluster).
MARK="# Written by llmret scripts/slurm-local.sh: a single-node test cluster. Do not use in production."
NODE=$(hostname -s)
DAEMONS=(slurmd slurmctld munged)  # stop order

die() { echo "slurm-local: $*" >&2; exit 1; }

need_binaries() {
    local missing=()
    for b in munged slurmctld slurmd sinfo sbatch squeue; do
        command -v "$b" >/dev/null || missing+=("$b")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: run '$0 install' (Debian: slurmctld slurmd slurm-client munge)"
}

cmd_install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        echo "slurm-local: slurm and munge already installed"
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "install needs root (apt-get)"
    # The packages' own services are not wanted (`up` starts its daemons): keep apt from
    # starting them, unless the machine already has a policy of its own.
    local policy=/usr/sbin/policy-rc.d added=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && added=1
    fi
    local rc=0
    { apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            slurmctld slurmd slurm-client munge; } || rc=$?
    [ -z "$added" ] || rm -f "$policy"
    [ $rc -eq 0 ] || die "apt-get install of slurmctld slurmd slurm-client munge failed ($rc)"
}

write_config() {
    mkdir -p "$STATE"/{munge,ctld,spool,log,dev}
    chmod 0755 "$STATE" "$STATE/munge"  # munged refuses a group/world-writable socket folder
    if [ ! -s "$STATE/munge/munge.key" ]; then
        head -c 1024 /dev/urandom >"$STATE/munge/munge.key"
    fi
    chmod 0400 "$STATE/munge/munge.key"
    local gpu_files=""
    if [ "$GPUS" -gt 0 ]; then
        for i in $(seq 0 $((GPUS - 1))); do
            # Slurm only hands out GRES backed by device files; /dev/null's numbers will do.
            [ -c "$STATE/dev/gpu$i" ] || mknod "$STATE/dev/gpu$i" c 1 3
        done
        gpu_files="$STATE/dev/gpu[0-$((GPUS - 1))]"
    fi
    cat >"$STATE/slurm.conf" <<EOF
$MARK
ClusterName=llmret-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default memory per CPU a job takes the whole node's memory: one job at a time.
DefMemPerCPU=1000
# squeue (no accounting database) must still see a job for a while after it ends.
MinJobAge=$MIN_JOB_AGE
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB$([ "$GPUS" -gt 0 ] && echo " Gres=gpu:$GPUS") State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    {
        echo "AutoDetect=off"
        [ "$GPUS" -gt 0 ] && echo "NodeName=$NODE Name=gpu File=$gpu_files"
    } >"$STATE/gres.conf"
}

stale_test_link() {  # $ETC_CONF is a link to another test cluster's config whose daemons are all gone
    [ -L "$ETC_CONF" ] || return 1
    local target dir
    target=$(readlink "$ETC_CONF")
    dir=$(dirname "$target")
    # A dangling link (its state folder removed) or one to a config this script wrote.
    if [ -e "$target" ]; then
        [ "$(head -n 1 "$target")" = "$MARK" ] || return 1
    fi
    for d in "${DAEMONS[@]}"; do
        [ -s "$dir/$d.pid" ] && kill -0 "$(cat "$dir/$d.pid")" 2>/dev/null && return 1
    done
    return 0
}

link_etc_conf() {
    mkdir -p /etc/slurm
    if [ -e "$ETC_CONF" ] || [ -L "$ETC_CONF" ]; then
        [ "$(readlink "$ETC_CONF" || true)" = "$STATE/slurm.conf" ] && return
        # A test run killed before `down` (or a machine image taken while one ran) leaves its
        # link behind; no daemon uses it, so it is replaced. Anything else is left alone.
        stale_test_link || die "$ETC_CONF exists and is not this test cluster's; not replacing it"
        echo "slurm-local: replacing $ETC_CONF, a link left by a stopped test cluster ($(readlink "$ETC_CONF"))" >&2
        rm -f "$ETC_CONF"
    fi
    ln -s "$STATE/slurm.conf" "$ETC_CONF"
}

running() {  # running NAME: the pid file names a live process
    local pidfile="$STATE/$1.pid"
    [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    local end=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || { echo "slurm-local: timed out waiting for $what" >&2; return 1; }
        sleep 0.5
    done
}

node_idle() { [ "$(SLURM_CONF="$STATE/slurm.conf" sinfo -h -n "$NODE" -o %T)" = idle ]; }

cmd_up() {
    [ "$(id -u)" -eq 0 ] || die "up needs root (daemons, mknod, $ETC_CONF)"
    need_binaries
    for d in "${DAEMONS[@]}"; do
        running "$d" && die "$d already running (pid $(cat "$STATE/$d.pid")); run '$0 down' first"
    done
    write_config
    link_etc_conf
    export SLURM_CONF="$STATE/slurm.conf"
    munged --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
        --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
    wait_for 10 munged running munged || { show_logs; cmd_down; exit 1; }
    # -i: ignore saved state of an earlier run (jobs, node states).
    slurmctld -i -f "$SLURM_CONF"
    wait_for 20 slurmctld running slurmctld || { show_logs; cmd_down; exit 1; }
    slurmd -f "$SLURM_CONF"
    wait_for 60 "node $NODE to be idle" node_idle || { show_logs; cmd_down; exit 1; }
    echo "slurm-local: up (node $NODE: $CPUS CPUs, $MEM_MB MB, $GPUS fake GPUs; SLURM_CONF=$SLURM_CONF)"
}

show_logs() {
    for f in "$STATE"/log/*.log; do
        [ -f "$f" ] && { echo "== $f"; tail -n 20 "$f"; } >&2
    done
    return 0
}

cmd_down() {
    local rc=0
    for d in "${DAEMONS[@]}"; do
        local pidfile="$STATE/$d.pid"
        [ -s "$pidfile" ] || continue
        local pid
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            local end=$((SECONDS + 20))
            while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.2; done
            if kill -0 "$pid" 2>/dev/null; then
                echo "slurm-local: $d (pid $pid) ignored SIGTERM; sending SIGKILL" >&2
                kill -KILL "$pid" || rc=1
            fi
        fi
        rm -f "$pidfile"
    done
    if [ "$(readlink "$ETC_CONF" 2>/dev/null || true)" = "$STATE/slurm.conf" ]; then
        rm -f "$ETC_CONF"
    fi
    echo "slurm-local: down"
    return $rc
}

cmd_status() {
    local rc=0
    for d in munged slurmctld slurmd; do
        if running "$d"; then echo "$d: running (pid $(cat "$STATE/$d.pid"))"; else echo "$d: stopped"; rc=1; fi
    done
    [ $rc -eq 0 ] && SLURM_CONF="$STATE/slurm.conf" sinfo -N -o "%N %T %c %m %G"
    return $rc
}

case "${1:-}" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) die "usage: $0 install|up|down|status" ;;
esac
