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


def test_srun_over_every_node_of_the_job():
    from downscaler.srun import SrunError, srun_command

    args = ["--ntasks-per-node=8", "--cpus-per-task=7", "python", "-m", "x", "-N", "3"]
    shown = []

    def show_job(job_id):
        shown.append(job_id)
        return "JobId=77 JobName=x\n   NumNodes=2 NumCPUs=112 NumTasks=16 CPUs/Task=7\n"

    # the jobstep left only SLURM_JOB_ID: the count comes from slurmctld
    assert srun_command(args, {"SLURM_JOB_ID": "77"}, show_job) == ["srun", "--nodes=2", *args]
    assert shown == ["77"]
    assert srun_command(args, {"SLURM_JOB_NUM_NODES": "4"}, show_job)[1] == "--nodes=4"
    assert srun_command(["-N2", "cmd"], {}, show_job) == ["srun", "-N2", "cmd"]
    with pytest.raises(SrunError, match="inside a Slurm job"):
        srun_command(args, {}, show_job)
    with pytest.raises(SrunError, match="no NumNodes"):
        srun_command(args, {"SLURM_JOB_ID": "77"}, lambda job_id: "JobState=RUNNING")
