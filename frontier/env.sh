# shellcheck shell=bash
# Environment for the workflow on OLCF Frontier. Source it on a login node before
# `snakemake --profile frontier`; sbatch --export=ALL hands it to every job, where it is
# completed per job (MASTER_ADDR/PORT) by sourcing it again or by downscaler.launcher.
#
#   export SBATCH_ACCOUNT=<project id>        # the allocation to charge
#   source frontier/env.sh                     # modules, conda env, RCCL/MIOpen settings
#   snakemake --profile frontier
#
# Override before sourcing: DOWNSCALER_ENV (conda env prefix), AWS_OFI_RCCL_DIR (plugin build).

# ROCm and the Cray programming environment. The rocm module must be the ROCm of the torch wheel
# pinned in envs/frontier.yaml (torch 2.13.0+rocm7.2 -> rocm/7.2.x); `module avail rocm` lists
# the installed ones; frontier/check_rocm.py below stops here when they differ.
module load PrgEnv-gnu/8.6.0
module load "rocm/${DOWNSCALER_ROCM_MODULE:-7.2.0}"
module load craype-accel-amd-gfx90a
module load miniforge3/23.11.0-0

# The conda environment built from envs/frontier.yaml (see frontier/README.md).
DOWNSCALER_ENV=${DOWNSCALER_ENV:-/lustre/orion/${SBATCH_ACCOUNT:-proj}/proj-shared/${USER}/envs/downscaler}
source activate "${DOWNSCALER_ENV}"

# A CUDA or CPU torch (pip's silent fallback when the ROCm index lacks the pinned wheel) or a
# wheel built for another ROCm than the module: say so now, not in the first job.
if ! python "$(dirname "${BASH_SOURCE[0]}")/check_rocm.py"; then
    echo "frontier/env.sh: stopped; fix the torch build first (frontier/README.md, step 1)" >&2
    return 1 2>/dev/null || exit 1
fi

if [ -z "${SBATCH_ACCOUNT:-}" ]; then
    echo "frontier/env.sh: set SBATCH_ACCOUNT=<project id> (the allocation to charge)" >&2
fi

# MIOpen's kernel database on node-local /tmp: the shared home/Lustre file systems lock up
# under 8 ranks per node compiling kernels. downscaler.launcher creates it on each node.
export MIOPEN_USER_DB_PATH="/tmp/miopen-${USER}"
export MIOPEN_CUSTOM_CACHE_DIR="${MIOPEN_USER_DB_PATH}"

# RCCL over Slingshot: the aws-ofi-rccl plugin (libfabric cxi) and the high-speed interfaces.
# RCCL finds the plugin (librccl-net.so) on LD_LIBRARY_PATH; without it RCCL silently falls back
# to TCP sockets over hsn0 and multi-node scaling collapses, so a missing build is reported here.
# `NCCL_DEBUG=INFO` in a job prints "NET/OFI" lines when the plugin is in use.
AWS_OFI_RCCL_DIR=${AWS_OFI_RCCL_DIR:-/lustre/orion/${SBATCH_ACCOUNT:-proj}/proj-shared/${USER}/aws-ofi-rccl}
if [ ! -f "${AWS_OFI_RCCL_DIR}/lib/librccl-net.so" ]; then
    echo "frontier/env.sh: no ${AWS_OFI_RCCL_DIR}/lib/librccl-net.so: build aws-ofi-rccl" \
         "(frontier/README.md, step 2) or set AWS_OFI_RCCL_DIR; RCCL would fall back to TCP" >&2
fi
export LD_LIBRARY_PATH="${AWS_OFI_RCCL_DIR}/lib:${LD_LIBRARY_PATH:-}"
export NCCL_SOCKET_IFNAME=hsn0     # bootstrap and sockets on the Slingshot interfaces
export GLOO_SOCKET_IFNAME=hsn0
export NCCL_NET_GDR_LEVEL=3        # GPU-direct RDMA between the GCDs and the NICs
export NCCL_CROSS_NIC=1
# libfabric cxi provider (Slingshot 11): no address translation services, the userfaultfd memory
# registration cache, a completion queue large enough for many ranks' traffic
export FI_CXI_ATS=0
export FI_MR_CACHE_MONITOR=userfaultfd
export FI_CXI_DEFAULT_CQ_SIZE=131072
export HSA_FORCE_FINE_GRAIN_PCIE=1
export OMP_NUM_THREADS=7           # = cpus_per_task

# Rendezvous: the first node of the job, a port per job (inside a job only; on the login node
# these stay unset so they are not exported into jobs). downscaler.launcher derives the same
# values from SLURM_JOB_NODELIST itself, so sourcing this inside the job is optional.
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
    export MASTER_ADDR
    export MASTER_PORT=$((29500 + ${SLURM_JOB_ID:-0} % 10000))
else
    unset MASTER_ADDR MASTER_PORT
fi
