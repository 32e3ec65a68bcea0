#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying the workflow's SLURM path
# (`snakemake --profile configs/slurm ...`) on a workstation and for CI. Needs root and a
# Debian or Ubuntu system (apt-get).
#   workflow/slurm/one_node.sh         start: install slurm-wlm and munge if missing, write
#                                      /etc/slurm/slurm.conf, start munged, slurmctld, slurmd
#                                      and wait until the node is idle; nothing if already up
#   workflow/slurm/one_node.sh status  exit 0 when the node takes jobs, 1 when it does not
#   workflow/slurm/one_node.sh stop    stop slurmctld, slurmd and munged
#
# The node is `hostname -s`, in the partition `cpu` that configs/slurm/config.yaml names, and
# is declared with SLURM_CPUS CPUs (default 16) and SLURM_MEM_MB MB (default 65536) whatever
# the machine has (SlurmdParameters=config_overrides): a 2-core machine then takes the
# profile's jobs as they are, an MPI job of one rank per hospital included. Memory is not a
# consumable resource (CR_Core): the profile's mem_mb only has to fit the declared size.
# No accounting database: `sacct` knows nothing, and a finished job is seen through `squeue`
# and `scontrol` for MinJobAge seconds (15 min) after it ends.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by slidefed workflow/slurm/one_node.sh"
NODE=$(hostname -s)
CPUS=${SLURM_CPUS:-16}
MEM_MB=${SLURM_MEM_MB:-65536}
LOGS=/var/log/slurm

die() { echo "one_node.sh: $*" >&2; exit 1; }

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true; }

is_up() {
    case "$(node_state)" in idle*|mixed*|allocated*|completing*) return 0 ;; esac
    return 1
}

stop() {
    if [ -f "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
        die "$CONF was not written by this script; stop that cluster with its own tools"
    fi
    # scontrol shutdown stops slurmctld and the slurmd it knows; the pid files catch the rest.
    scontrol shutdown >/dev/null 2>&1 || true
    for pidfile in /run/slurmctld.pid /run/slurmd.pid /run/munge/munged.pid; do
        if [ -f "$pidfile" ]; then
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && die "process $pid ($pidfile) did not stop"
            rm -f "$pidfile"
        fi
    done
    echo "one_node.sh: SLURM stopped"
}

install() {
    command -v apt-get >/dev/null || die "no apt-get: install slurm-wlm and munge by hand"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
        >/dev/null
}

write_conf() {
    cat > "$CONF" <<EOF
$MARK
ClusterName=slidefed
SlurmctldHost=$NODE
AuthType=auth/munge
CredType=cred/munge
SlurmUser=slurm
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=900
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    [ "$(id -u)" -eq 0 ] || die "needs root (apt-get, /etc/slurm, daemons)"
    if [ -f "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching that cluster"
    fi
    if is_up; then echo "one_node.sh: SLURM already up"; return; fi
    for tool in slurmctld slurmd sinfo munged; do
        command -v "$tool" >/dev/null || { install; break; }
    done
    mkdir -p /etc/slurm "$LOGS"
    chown slurm:slurm "$LOGS" /var/lib/slurm/slurmctld
    write_conf

    # munged runs as munge, with its socket directory owned by munge.
    [ -s /etc/munge/munge.key ] || mungekey --create --force
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 0755 /run/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
        munge -n | unmunge >/dev/null || die "munged does not answer"
    fi

    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 60); do
        case "$(node_state)" in
            idle*) echo "one_node.sh: SLURM up: node $NODE, partition cpu, $CPUS CPUs"; return ;;
        esac
        sleep 1
    done
    die "node $NODE not idle after 60 s (state: $(node_state)); see $LOGS/slurmctld.log, $LOGS/slurmd.log"
}

case "${1:-start}" in
    start) start ;;
    status) is_up ;;
    stop) stop ;;
    *) die "usage: $0 [start|status|stop]" ;;
esac
