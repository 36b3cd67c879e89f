#!/usr/bin/env bash
# A single-node Slurm on this machine (Debian 12, root, no systemd), for tests/aiida/test_slurm.py.
# Idempotent: installs what is missing, writes slurm.conf only when it changed, starts only the daemons that
# are not running (munged, slurmctld, slurmd: PID files under /run), resumes the node if it is down, then
# checks that a job runs.  Partition `debug` (default); the node is this machine's short hostname.
# Stop:  kill "$(cat /run/slurmd.pid)" "$(cat /run/slurmctld.pid)" "$(cat /run/munge/munged.pid)"
# (see /work/shared/notes/slurm-single-node.md, docs/hpc.md).
set -euo pipefail

PARTITION=${AIIDA_DM21_SLURM_PARTITION:-debug}
CONF=/etc/slurm/slurm.conf
log() { echo "slurm.sh: $*"; }

alive() {  # alive PIDFILE: the process of that PID file is running
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# --- packages ----------------------------------------------------------------------------------------------
missing=()
for pkg in slurmctld slurmd slurm-client munge; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    # no service may start from the package scripts (an sshd on every address, say): we start our own
    no_start=0; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; no_start=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ "$no_start" = 0 ] || rm -f /usr/sbin/policy-rc.d
fi

# --- munge -------------------------------------------------------------------------------------------------
mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then  # the package makes one; make it if it is not there
    log 'creating /etc/munge/munge.key'
    if command -v mungekey >/dev/null; then mungekey --create --force; else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if alive /run/munge/munged.pid; then
    log "munged running (pid $(cat /run/munge/munged.pid))"
else
    log 'starting munged'
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
    su -s /bin/sh munge -c /usr/sbin/munged
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi
munge -n | unmunge >/dev/null || { log 'munge does not work'; exit 1; }

# --- slurm.conf ----------------------------------------------------------------------------------------------
host=$(hostname -s)
# the node's hardware as slurmd sees it; RealMemory a little under the real value
node_line=$(/usr/sbin/slurmd -C | head -n1)
memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
node_line=$(sed "s/RealMemory=[0-9]*/RealMemory=$(( memory * 9 / 10 ))/" <<<"$node_line")
new_conf=$(cat <<EOF
# written by aiida-dm21 .ci/slurm.sh: single node, no cgroups, no accounting database
ClusterName=dm21ci
SlurmctldHost=$host
SlurmUser=slurm
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
MinJobAge=30
$node_line State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
chown slurm:slurm /var/spool/slurmctld /var/log/slurm
conf_changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    log "writing $CONF"
    printf '%s\n' "$new_conf" >"$CONF"
    conf_changed=1
fi

# --- daemons -----------------------------------------------------------------------------------------------
if [ "$conf_changed" = 1 ]; then  # a running daemon would keep the old configuration: restart it
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        if alive "$pidfile"; then
            log "restarting for the new configuration: stopping pid $(cat "$pidfile")"
            pid=$(cat "$pidfile"); kill "$pid"
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        fi
    done
fi
if alive /run/slurmctld.pid; then
    log "slurmctld running (pid $(cat /run/slurmctld.pid))"
else
    log 'starting slurmctld'
    /usr/sbin/slurmctld
fi
for _ in $(seq 30); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
if alive /run/slurmd.pid; then
    log "slurmd running (pid $(cat /run/slurmd.pid))"
else
    log 'starting slurmd'
    /usr/sbin/slurmd
fi

# --- the node idle, a job runs ----------------------------------------------------------------------------
state=''
for _ in $(seq 40); do
    state=$(sinfo -h -n "$host" -o '%t' 2>/dev/null | head -n1)
    case "$state" in
        idle*|mix*|alloc*) break ;;
        down*|drain*|drng*) log "node $host is $state: resuming it"; scontrol update NodeName="$host" State=RESUME || true ;;
    esac
    sleep 0.5
done
case "$state" in
    idle*|mix*|alloc*) ;;
    *) log "node $host is not up (state '$state'); see /var/log/slurm/"; sinfo; exit 1 ;;
esac
out=$(sbatch --parsable --wait -t 1 -o /dev/null --wrap true) || { log "a test job failed ($out)"; exit 1; }
sinfo
log "Slurm up: node $host, partition $PARTITION, test job $out completed"
