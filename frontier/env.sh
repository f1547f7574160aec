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

# ROCm and the Cray programming environment (versions must match the ROCm of the torch wheel
# in envs/frontier.yaml; `module avail rocm` lists those installed).
module load PrgEnv-gnu/8.6.0
module load rocm/6.4.1
module load craype-accel-amd-gfx90a
module load miniforge3/23.11.0-0

# The conda environment built from envs/frontier.yaml (see frontier/README.md).
DOWNSCALER_ENV=${DOWNSCALER_ENV:-/lustre/orion/${SBATCH_ACCOUNT:-proj}/proj-shared/${USER}/envs/downscaler}
source activate "${DOWNSCALER_ENV}"

if [ -z "${SBATCH_ACCOUNT:-}" ]; then
    echo "frontier/env.sh: set SBATCH_ACCOUNT=<project id> (the allocation to charge)" >&2
fi

# MIOpen's kernel database on node-local /tmp: the shared home/Lustre file systems lock up
# under 8 ranks per node compiling kernels. downscaler.launcher creates it on each node.
export MIOPEN_USER_DB_PATH="/tmp/miopen-${USER}"
export MIOPEN_CUSTOM_CACHE_DIR="${MIOPEN_USER_DB_PATH}"

# RCCL over Slingshot: the aws-ofi-rccl plugin (libfabric cxi) and the high-speed interfaces.
AWS_OFI_RCCL_DIR=${AWS_OFI_RCCL_DIR:-/lustre/orion/${SBATCH_ACCOUNT:-proj}/proj-shared/${USER}/aws-ofi-rccl}
export LD_LIBRARY_PATH="${AWS_OFI_RCCL_DIR}/lib:${LD_LIBRARY_PATH:-}"
export NCCL_SOCKET_IFNAME=hsn0
export GLOO_SOCKET_IFNAME=hsn0
export NCCL_NET_GDR_LEVEL=3        # GPU-direct RDMA
export NCCL_CROSS_NIC=1
export FI_CXI_ATS=0
export FI_MR_CACHE_MONITOR=userfaultfd
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
