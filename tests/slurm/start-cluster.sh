#!/usr/bin/env bash
# Start a small Slurm cluster on this machine for the tests (tests/test_slurm.py, make
# test-slurm): munge, slurmctld and one slurmd per emulated node (`slurmd -N`), as root, without
# systemd, everything they write in one state folder. Two nodes of 2 CPUs by default (on this
# machine's 2 cores), so multi-node job steps are tested too. Stop it with
# tests/slurm/stop-cluster.sh STATE_DIR (it kills only the processes this script started, by pid).
#
#   tests/slurm/start-cluster.sh [STATE_DIR]     # default /tmp/downscaler-slurm
#
# Installs slurm-wlm and munge with apt-get when they are missing (Debian/Ubuntu, root).
# Exit status: 0 cluster up; 2 cannot run here (not root, no apt-get, install failed; the reason
# on stderr, the tests skip on it); 1 the daemons did not come up (their logs are named).
set -euo pipefail

STATE_DIR=$(realpath -m "${1:-/tmp/downscaler-slurm}")
NODES=${SLURM_TEST_NODES:-2}                  # emulated nodes, all on this host
CPUS=${SLURM_TEST_CPUS:-2}                    # per node
MAX_TIME=${SLURM_TEST_MAX_TIME:-60}           # partition time limit, minutes
PARTITION=${SLURM_TEST_PARTITION:-debug}
ETC_CONF=/etc/slurm/slurm.conf
MARKER="# written by downscaler tests/slurm/start-cluster.sh"

cannot() { echo "start-cluster.sh: cannot start Slurm here: $*" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || cannot "needs root (slurmd runs jobs as their users; munge needs /etc/munge)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || cannot "slurm-wlm/munge are not installed and there is no apt-get"
    echo "start-cluster.sh: installing slurm-wlm and munge (apt-get, about a minute)" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq slurm-wlm munge; } >"${TMPDIR:-/tmp}/downscaler-slurm-apt.log" 2>&1 \
        || cannot "apt-get install slurm-wlm munge failed; see ${TMPDIR:-/tmp}/downscaler-slurm-apt.log"
fi

if [ -e "$ETC_CONF" ] && ! grep -qF "$MARKER" "$ETC_CONF"; then
    cannot "$ETC_CONF exists and was not written by this script (a real cluster?); not touching it"
fi
if [ -s "$STATE_DIR/started.pids" ]; then
    cannot "$STATE_DIR/started.pids exists: a test cluster is running; stop it first with tests/slurm/stop-cluster.sh $STATE_DIR"
fi

mkdir -p "$STATE_DIR"/{state,spool,munge}
: >"$STATE_DIR/started.pids"
HOST=$(hostname -s)
NODE_NAMES=("$HOST" localhost)
[ "$NODES" -ge 1 ] && [ "$NODES" -le 2 ] || cannot "SLURM_TEST_NODES=$NODES: 1 or 2 emulated nodes"

# munge: reuse a running munged (its socket answers); else start one on the package's key.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    munged --force --pid-file="$STATE_DIR/munge/munged.pid" \
        --log-file="$STATE_DIR/munge/munged.log" --seed-file="$STATE_DIR/munge/munged.seed" \
        2>>"$STATE_DIR/munge/munged.stderr"
    for _ in $(seq 50); do [ -s "$STATE_DIR/munge/munged.pid" ] && break; sleep 0.1; done
    cat "$STATE_DIR/munge/munged.pid" >>"$STATE_DIR/started.pids"
    munge -n | unmunge >/dev/null || { echo "munged did not start: $STATE_DIR/munge/" >&2; exit 1; }
fi

# The config: here, and at the default path too, because the snakemake slurm jobstep executor
# strips SLURM_CONF from the environment of the srun it runs inside each job.
cat >"$STATE_DIR/slurm.conf" <<EOF
$MARKER (state in $STATE_DIR)
ClusterName=downscaler-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# squeue keeps finished jobs this long; the executor plugin queries squeue (no accounting here)
MinJobAge=300
# seconds between the time-limit SIGTERM and SIGKILL (the training saves in that window too)
KillWait=30
SlurmctldPort=6817
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd-%n.log
EOF
# Emulated nodes: one slurmd each (`slurmd -N NAME`), on its own port, all on this host. Their
# names must resolve (jobs meet at the first node of their node list): this host's name and
# localhost.
for i in $(seq "$NODES"); do
    echo "NodeName=${NODE_NAMES[$((i - 1))]} NodeHostname=$HOST NodeAddr=127.0.0.1" \
         "Port=$((6817 + i)) CPUs=$CPUS RealMemory=4000 State=UNKNOWN" >>"$STATE_DIR/slurm.conf"
done
echo "PartitionName=$PARTITION Nodes=$(IFS=,; echo "${NODE_NAMES[*]:0:$NODES}") Default=YES" \
     "MaxTime=$MAX_TIME State=UP" >>"$STATE_DIR/slurm.conf"
mkdir -p /etc/slurm
cp "$STATE_DIR/slurm.conf" "$ETC_CONF"

slurmctld -f "$ETC_CONF" -i
for _ in $(seq 50); do [ -s "$STATE_DIR/slurmctld.pid" ] && break; sleep 0.1; done
cat "$STATE_DIR/slurmctld.pid" >>"$STATE_DIR/started.pids"
for name in "${NODE_NAMES[@]:0:$NODES}"; do
    mkdir -p "$STATE_DIR/spool/$name"
    slurmd -f "$ETC_CONF" -N "$name"
    for _ in $(seq 50); do [ -s "$STATE_DIR/slurmd-$name.pid" ] && break; sleep 0.1; done
    cat "$STATE_DIR/slurmd-$name.pid" >>"$STATE_DIR/started.pids"
done

# Up when every node is idle.
for _ in $(seq 60); do
    states=$(sinfo -h -N -o %t 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [ "$states" = "idle " ] && [ "$(sinfo -h -N -o %N | wc -l)" -eq "$NODES" ]; then
        echo "start-cluster.sh: Slurm up: $NODES nodes x $CPUS CPUs on $HOST, partition" \
             "$PARTITION (MaxTime $MAX_TIME min); stop: tests/slurm/stop-cluster.sh $STATE_DIR" >&2
        exit 0
    fi
    sleep 0.5
done
echo "start-cluster.sh: the nodes did not become idle (states '${states:-none}');" \
     "see $STATE_DIR/slurmctld.log and $STATE_DIR/slurmd-*.log" >&2
exit 1
