"""downscaler.cluster: the dask worker jobs it asks Slurm for, and how the address reaches the
workflow. (Running them on a real Slurm: tests/test_slurm.py.)"""

import json

import pytest
from downscaler.cluster import WorkerJobs, slurm_cluster_kwargs, with_scheduler

pytest.importorskip("dask_jobqueue", reason="needs dask-jobqueue (envs/requirements.txt)")


def test_worker_job_script_for_frontier_nodes():
    from dask_jobqueue import SLURMCluster

    jobs = WorkerJobs(workers=8, cores=56, memory="480GB", walltime="02:00:00", queue="batch",
                      account="cli999", job_extra=["-C nvme"])
    with SLURMCluster(**slurm_cluster_kwargs(jobs)) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH -p batch", "#SBATCH -A cli999", "#SBATCH -n 1",
                 "#SBATCH --cpus-per-task=56", "#SBATCH -t 02:00:00", "#SBATCH -C nvme"):
        assert line in script, (line, script)
    assert "--nthreads 56" in script  # one worker process per job, all its cores as threads


def test_snakemake_command_gets_the_scheduler_address_merged_into_regrid():
    cmd = with_scheduler(["snakemake", "--profile", "frontier"], "tcp://10.0.0.1:8786")
    assert cmd[:3] == ["snakemake", "--profile", "frontier"]
    assert cmd[3] == "--config"
    key, value = cmd[4].split("=", 1)
    assert key == "regrid" and json.loads(value) == {"scheduler": "tcp://10.0.0.1:8786"}
    assert with_scheduler(["python", "x.py"], "tcp://a:1") == ["python", "x.py"]


def test_bad_worker_counts_are_refused():
    with pytest.raises(ValueError, match="--workers"):
        WorkerJobs(workers=0).check()
