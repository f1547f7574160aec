#!/usr/bin/env bash
# Stop the test cluster started by tests/slurm/start-cluster.sh STATE_DIR: cancel its jobs, then
# end the daemons it started (munged, slurmctld, slurmd), each by the pid it recorded, and remove
# the /etc/slurm/slurm.conf it wrote. Safe to run twice.
set -uo pipefail

STATE_DIR=$(realpath -m "${1:-/tmp/downscaler-slurm}")
ETC_CONF=/etc/slurm/slurm.conf
MARKER="# written by downscaler tests/slurm/start-cluster.sh"
PIDS="$STATE_DIR/started.pids"

if [ ! -s "$PIDS" ]; then
    echo "stop-cluster.sh: nothing recorded in $PIDS; nothing to stop" >&2
    exit 0
fi

# Jobs first, while slurmctld still runs, so no job step outlives the cluster.
if [ -f "$STATE_DIR/slurm.conf" ]; then
    SLURM_CONF="$STATE_DIR/slurm.conf" scancel --partition="$(awk -F'[= ]' '/^PartitionName=/{print $2}' "$STATE_DIR/slurm.conf")" 2>/dev/null
    for _ in $(seq 40); do
        [ -z "$(SLURM_CONF="$STATE_DIR/slurm.conf" squeue -h -t R,CG,PD 2>/dev/null)" ] && break
        sleep 0.5
    done
fi

# Daemons in reverse order of start (slurmd, slurmctld, munged), each by its recorded pid.
tac "$PIDS" | while read -r pid; do
    [ -n "$pid" ] || continue
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
done
rm -f "$PIDS"

if [ -f "$ETC_CONF" ] && grep -qF "$MARKER" "$ETC_CONF"; then
    rm -f "$ETC_CONF"
fi
echo "stop-cluster.sh: stopped the test cluster of $STATE_DIR" >&2
