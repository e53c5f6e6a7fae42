#!/usr/bin/env bash
# A real one-node SLURM for the tests: slurmctld + slurmd + munged from the distribution's packages,
# CPU only, in a private directory with its own ports and munge socket (so a SLURM that already runs on
# the machine is left alone and not used).
#
#   bash tests/slurm/setup_slurm.sh start DIR   # installs what is missing (apt, needs root), writes
#                                               # DIR/slurm.conf, starts the daemons, waits for the node
#   export SLURM_CONF=DIR/slurm.conf            # then sbatch / squeue / scontrol / scancel use it
#   bash tests/slurm/setup_slurm.sh stop DIR    # stops the daemons this script started in DIR
#   bash tests/slurm/setup_slurm.sh install     # only the packages (.ci/run, before the suite)
#
# Debian/Ubuntu packages: slurmctld, slurmd, slurm-client, munge (SLURM 22.05 on Debian 12). The node
# is the machine itself (NodeName = `hostname -s`, address 127.0.0.1) with its real core count and
# memory; no accounting database, no cgroups (proctrack/linuxproc), jobs run as the submitting user.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR, or $0 install" >&2; exit 2; }
ACTION=${1:-}
if [[ "$ACTION" != install ]]; then
    [[ $# -eq 2 ]] || usage
    DIR=$(mkdir -p "$2" && cd "$2" && pwd)
fi

say() { echo "[setup_slurm] $*" >&2; }

stop() {
    local name pid
    for name in slurmd slurmctld munged; do
        [[ -f "$DIR/$name.pid" ]] || continue
        pid=$(cat "$DIR/$name.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        fi
        rm -f "$DIR/$name.pid"
    done
    say "stopped the daemons in $DIR"
}

install_missing() {
    local missing=()
    command -v slurmctld >/dev/null 2>&1 || [[ -x /usr/sbin/slurmctld ]] || missing+=(slurmctld)
    command -v slurmd >/dev/null 2>&1 || [[ -x /usr/sbin/slurmd ]] || missing+=(slurmd)
    command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
    command -v munged >/dev/null 2>&1 || [[ -x /usr/sbin/munged ]] || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        say "missing ${missing[*]} and cannot install them (needs root and apt-get)"
        exit 3
    fi
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start() {
    if [[ $(id -u) -ne 0 ]]; then
        say "must run as root (slurmd starts jobs as their user)"
        exit 3
    fi
    install_missing
    export PATH="$PATH:/usr/sbin"
    stop 2>/dev/null || true
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
    rm -f "$DIR/munge/munged.pid"
    local node cpus memory ctld_port slurmd_port
    node=$(hostname -s)
    cpus=$(nproc)
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MiB, less 1 GiB for the system
    ctld_port=$(free_port)
    slurmd_port=$(free_port)

    # munge: our own daemon, key and socket, run as root like the other two daemons (--force: munged warns
    # about root), so that DIR may sit under a private folder (pytest's). The socket's folder must be open
    # to every user, the key private.
    mkdir -p "$DIR/munge-key"
    chmod 755 "$DIR/munge"
    chmod 700 "$DIR/munge-key"
    if [[ ! -f "$DIR/munge-key/munge.key" ]]; then
        dd if=/dev/urandom of="$DIR/munge-key/munge.key" bs=1024 count=1 status=none
    fi
    chmod 400 "$DIR/munge-key/munge.key"
    munged --force --key-file="$DIR/munge-key/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    for _ in $(seq 50); do [[ -s "$DIR/munge/munged.pid" ]] && break; sleep 0.1; done
    cp "$DIR/munge/munged.pid" "$DIR/munged.pid"

    cat > "$DIR/slurm.conf" <<EOF
# Written by tests/slurm/setup_slurm.sh: one node, CPU only, private state in $DIR.
ClusterName=lime-ci
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# Finished jobs stay visible to scontrol for 10 minutes (their exit codes are read from there).
MinJobAge=600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=ci Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    echo "CgroupPlugin=autodetect" > "$DIR/cgroup.conf"  # unused (proctrack/linuxproc, task/none)
    export SLURM_CONF="$DIR/slurm.conf"
    slurmctld -f "$DIR/slurm.conf"
    slurmd -f "$DIR/slurm.conf"
    for _ in $(seq 150); do
        if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            say "SLURM $(sinfo -V | awk '{print $2}') up: node $node, $cpus CPUs, ${memory} MiB, ctld port $ctld_port; export SLURM_CONF=$DIR/slurm.conf"
            return 0
        fi
        sleep 0.2
    done
    say "the node did not come up within 30 s; slurmctld log:"
    tail -n 20 "$DIR/slurmctld.log" >&2 || true
    tail -n 20 "$DIR/slurmd.log" >&2 || true
    stop
    exit 1
}

case "$ACTION" in
    install) install_missing ;;
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
