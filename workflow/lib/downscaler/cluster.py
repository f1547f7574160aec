"""Dask workers as Slurm jobs for the preprocessing stages (regrid / pairs), via dask-jobqueue.

`regrid.scheduler: tcp://host:port` already sends the pairs stage's dask graphs to a running
dask.distributed scheduler. This module provides one: a `SLURMCluster` whose scheduler runs
here (the login node) and whose workers are Slurm jobs on other nodes, then runs a command --
usually snakemake -- with `regrid.scheduler` set to its address, and takes the workers down
when the command ends:

    python -m downscaler.cluster --workers 8 --cores 56 --memory 480GB --walltime 02:00:00 \\
        --queue batch --account $SBATCH_ACCOUNT -- snakemake --profile frontier

(`--config regrid={"scheduler": ...}` is appended to a snakemake command; Snakemake merges it
into the config, so the other regrid keys stay.) The pairs job, wherever it runs, connects to
that scheduler and its chunks are regridded on the workers. Needs `distributed` and
`dask-jobqueue` (envs/requirements.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerJobs:
    """What each dask worker job asks Slurm for (one worker process per job)."""

    workers: int = 2
    cores: int = 1
    memory: str = "2GB"
    walltime: str = "01:00:00"
    queue: str | None = None
    account: str | None = None
    interface: str | None = None  # network interface the workers and scheduler use (hsn0)
    job_extra: list[str] = field(default_factory=list)  # more #SBATCH lines, e.g. -C nvme
    local_directory: str | None = None  # worker spill space (node-local disk)

    def check(self) -> None:
        if self.workers < 1 or self.cores < 1:
            raise ValueError(f"dask cluster: --workers ({self.workers}) and --cores "
                             f"({self.cores}) must be at least 1")


def slurm_cluster_kwargs(jobs: WorkerJobs) -> dict:
    """Keyword arguments of dask_jobqueue.SLURMCluster for `jobs`."""
    kwargs = {"cores": jobs.cores, "processes": 1, "memory": jobs.memory,
              "walltime": jobs.walltime, "job_extra_directives": list(jobs.job_extra),
              "python": sys.executable, "name": "downscaler-dask",
              # a shared login node: any free port for the dashboard, not 8787
              "scheduler_options": {"dashboard_address": ":0"}}
    for key, value in (("queue", jobs.queue), ("account", jobs.account),
                       ("interface", jobs.interface), ("local_directory", jobs.local_directory)):
        if value:
            kwargs[key] = value
    return kwargs


@contextlib.contextmanager
def slurm_cluster(jobs: WorkerJobs, timeout_s: float = 600) -> Iterator[str]:
    """Start `jobs.workers` dask workers as Slurm jobs; yield the scheduler address.

    Waits until every worker has joined (they wait in the queue like any job), so the work
    that follows is spread over all of them; the jobs are cancelled on exit.
    """
    jobs.check()
    try:
        from dask_jobqueue import SLURMCluster
        from distributed import Client
    except ImportError as err:
        raise ImportError("dask workers on Slurm need `distributed` and `dask-jobqueue` "
                          "(pip install -r envs/requirements.txt)") from err
    with SLURMCluster(**slurm_cluster_kwargs(jobs)) as cluster:
        log.info("dask worker job script:\n%s", cluster.job_script())
        cluster.scale(jobs=jobs.workers)
        with Client(cluster) as client:
            try:
                client.wait_for_workers(jobs.workers, timeout=timeout_s)
            except TimeoutError as err:
                raise RuntimeError(
                    f"only {len(client.scheduler_info()['workers'])} of {jobs.workers} dask "
                    f"worker jobs started within {timeout_s:.0f} s; check `squeue` and the "
                    "worker jobs' output (dask-worker-*.err)") from err
            log.info("dask: %d workers at %s", jobs.workers, cluster.scheduler_address)
            yield cluster.scheduler_address
            # what each worker job did (evidence the work was spread, in the command's log)
            done = client.run(lambda dask_worker: dask_worker.state.executed_count)
            log.info("dask: tasks run per worker: %s", ", ".join(
                f"{addr} {count}" for addr, count in sorted(done.items())))


def with_scheduler(command: Sequence[str], address: str) -> list[str]:
    """`command` with regrid.scheduler set to `address` (appended to a snakemake command)."""
    command = list(command)
    if command and os.path.basename(command[0]) == "snakemake":
        command += ["--config", "regrid=" + json.dumps({"scheduler": address})]
    return command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m downscaler.cluster",
        description="Run COMMAND with dask workers started as Slurm jobs (regrid.scheduler).")
    parser.add_argument("--workers", type=int, default=2, help="worker jobs (1 worker each)")
    parser.add_argument("--cores", type=int, default=1, help="cores per worker job")
    parser.add_argument("--memory", default="2GB", help="memory per worker job")
    parser.add_argument("--walltime", default="01:00:00")
    parser.add_argument("--queue", help="Slurm partition of the worker jobs")
    parser.add_argument("--account", default=os.environ.get("SBATCH_ACCOUNT"))
    parser.add_argument("--interface", help="network interface (Frontier: hsn0)")
    parser.add_argument("--local-directory", help="worker spill space (node-local)")
    parser.add_argument("--job-extra", action="append", default=[],
                        help="extra #SBATCH option, e.g. -C nvme (repeatable)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for workers")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the command, e.g. snakemake --profile frontier")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. -- snakemake --profile frontier")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    jobs = WorkerJobs(workers=args.workers, cores=args.cores, memory=args.memory,
                      walltime=args.walltime, queue=args.queue, account=args.account,
                      interface=args.interface, job_extra=args.job_extra,
                      local_directory=args.local_directory)
    with slurm_cluster(jobs, timeout_s=args.timeout) as address:
        code = subprocess.run(with_scheduler(command, address)).returncode
    return code


if __name__ == "__main__":
    sys.exit(main())
