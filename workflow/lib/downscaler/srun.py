"""`srun` over every node of the current Slurm job: the training rule's launcher on a cluster.

Snakemake's slurm jobstep executor removes every SLURM_* variable but the job id before it runs
a rule, SLURM_NNODES included. An srun without -N then starts its tasks on ONE node of a
multi-node job (measured with Slurm 22.05 on a two-node test cluster: `--ntasks-per-node=1` in a
2-node job gave 1 task). This module asks slurmctld for the job's node count and runs

    srun --nodes=N <the given srun options> <command>

so `--ntasks-per-node=8` means nodes x 8 ranks. The profiles' `mpi` resource is
`python -m downscaler.srun --ntasks-per-node=8 ...` (frontier/config.v8+.yaml).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence


class SrunError(RuntimeError):
    """Not inside a Slurm job, or slurmctld did not say how many nodes it has."""


def _scontrol(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def job_nodes(env: Mapping[str, str], show_job: Callable[[str], str] = _scontrol) -> int:
    """Node count of the job this process runs in (SLURM_JOB_NUM_NODES, else slurmctld)."""
    if env.get("SLURM_JOB_NUM_NODES", "").isdigit():
        return int(env["SLURM_JOB_NUM_NODES"])
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        raise SrunError("python -m downscaler.srun runs inside a Slurm job (SLURM_JOB_ID is "
                        "unset); outside Slurm leave the `mpi` resource empty")
    try:
        text = show_job(job_id)
    except (OSError, subprocess.SubprocessError) as err:
        raise SrunError(f"`scontrol show job {job_id}` failed: {err}") from err
    match = re.search(r"\bNumNodes=(\d+)", text)
    if not match:
        raise SrunError(f"`scontrol show job {job_id}` gave no NumNodes: {text[:200]!r}")
    return int(match[1])


def srun_command(args: Sequence[str], env: Mapping[str, str],
                 show_job: Callable[[str], str] = _scontrol) -> list[str]:
    """`srun --nodes=N ARGS`, or `srun ARGS` when its options already name a node count.

    The srun options are the arguments before the command (the first one not starting with
    "-"), so write them in the `--option=value` form.
    """
    options = []
    for arg in args:
        if not arg.startswith("-"):
            break
        options.append(arg)
    if any(re.match(r"(-N|--nodes)(=|$)|-N\d", a) for a in options):
        return ["srun", *args]
    return ["srun", f"--nodes={job_nodes(env, show_job)}", *args]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command = srun_command(args, os.environ)
    except SrunError as err:
        sys.exit(f"downscaler.srun: {err}")
    sys.stdout.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
