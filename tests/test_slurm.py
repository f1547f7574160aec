"""The workflow through a real Slurm: a small cluster started on this machine for the tests.

tests/slurm/start-cluster.sh installs (apt) and starts munge, slurmctld and two emulated nodes
(one slurmd each, 2 CPUs each, all on this host); the module fixture stops them again
(tests/slurm/stop-cluster.sh, by pid). The workflow runs with the
profile tests/slurm/profile, which is the Frontier profile with this machine's site values.
These tests take about 11 minutes on 2 cores, so they run with `make test-slurm` (which sets
DOWNSCALER_SLURM_TESTS=1), as root on a Debian/Ubuntu machine; elsewhere they skip and say why.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SCRIPTS = REPO / "tests" / "slurm"
PROFILE = SCRIPTS / "profile"
ENABLE = "DOWNSCALER_SLURM_TESTS"

TINY = {
    "seed": 3,
    "source": "synthetic",
    "region": {"south": 40.0, "north": 48.0, "west": 0.0, "east": 16.0},
    "resolution": 0.5,  # 16 x 32 fine cells -> 4 x 8 coarse cells
    "period": {"start": "2000-01-01", "end": "2000-02-29"},
    "split": {
        "train": {"start": "2000-01-01", "end": "2000-02-09"},
        "val": {"start": "2000-02-10", "end": "2000-02-19"},
        "test": {"start": "2000-02-20", "end": "2000-02-29"},
    },
    "regrid": {"factor": 4},
    "tiles": {"div_lat": 1, "div_lon": 2, "halo": 1},
    "train": {"epochs": 2, "batch_size": 16, "workers": 0},
}
# Rules that run as Slurm jobs (the others are localrules: source, scaling_figure, all).
BATCH_RULES = ("pairs", "tiles", "train", "infer_test", "fit_baselines", "evaluate",
               "tiles_seam_check", "bench_tiles_scaling", "bench_train_scaling")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running test Slurm cluster for this module; stopped afterwards, whatever happens."""
    if os.environ.get(ENABLE) != "1":
        pytest.skip(f"real-Slurm tests (about 11 min) run with `make test-slurm` ({ENABLE}=1)")
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (munge keys, slurmd)")
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run([str(SCRIPTS / "start-cluster.sh"), str(state)],
                           capture_output=True, text=True, timeout=900)
    if start.returncode == 2:
        pytest.skip(start.stderr.strip())
    try:
        if start.returncode != 0:
            pytest.fail(f"the test cluster did not start:\n{start.stderr}")
        yield state
    finally:
        subprocess.run([str(SCRIPTS / "stop-cluster.sh"), str(state)], timeout=120)


def snakemake(workdir: Path, config: dict, *args: str, profile: Path | None = PROFILE,
              timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the repository's Snakefile in `workdir` (through Slurm unless profile is None)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    where = ["--profile", str(profile)] if profile else ["--cores", "2"]
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), *where, *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)


def explain(result: subprocess.CompletedProcess, workdir: Path) -> str:
    logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}"
                     for p in sorted(workdir.rglob("*.log")) if p.is_file())
    return f"snakemake exit {result.returncode}:\n{result.stderr[-5000:]}\n{logs}"


def submitted_rules(output: str) -> dict[str, list[str]]:
    """Rule name -> Slurm job ids, from the executor's "submitted with SLURM jobid" lines."""
    jobs: dict[str, list[str]] = {}
    for jobid, rule in re.findall(r"SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+?)/", output):
        jobs.setdefault(rule, []).append(jobid)
    return jobs


def model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["model_state"]


def test_demo_workflow_end_to_end_through_sbatch_and_srun(slurm_cluster, tmp_path):
    work = tmp_path / "demo"
    result = snakemake(work, TINY)
    assert result.returncode == 0, explain(result, work)
    # every non-local rule ran as a Slurm job; source (a download on a cluster) stayed local
    jobs = submitted_rules(result.stderr)
    assert set(jobs) == set(BATCH_RULES), jobs
    assert len(jobs["tiles"]) == 2 and all(len(jobs[r]) == 1 for r in BATCH_RULES if r != "tiles")
    # the outputs, and each rule's log where the README says (logs/<rule>.log, benchmarks)
    for path in ("results/model/checkpoint.pt", "results/downscaled/test.nc",
                 "results/evaluation/metrics.csv", "results/evaluation/figures/maps_t2m.png"):
        assert (work / path).stat().st_size > 0, path
    for log in ("source", "pairs", "tiles_train", "tiles_val", "train", "evaluate",
                "tiles_seam_check", "infer/test"):
        assert (work / "logs" / f"{log}.log").is_file(), log
    for bench in ("pairs", "tiles_train", "train", "infer_test", "evaluate"):
        assert (work / "results" / "benchmarks" / f"{bench}.tsv").is_file(), bench
    # training: one Slurm job, one srun step of 2 tasks, each a rank of a world of 2 (gloo)
    for rank in (0, 1):
        text = (work / "logs" / "train" / f"rank{rank}.log").read_text()
        assert f"rank{rank} training" in text and "world 2, cpu" in text, text[:500]
    assert '"world_size": 2' in (work / "logs" / "train.log").read_text()


def _derived_profile(tmp_path: Path, **train: object) -> Path:
    """tests/slurm/profile with some of the train rule's resources changed."""
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    settings = yaml.safe_load((PROFILE / "config.v8+.yaml").read_text())
    settings["set-resources"]["train"].update(train)
    (profile / "config.v8+.yaml").write_text(yaml.safe_dump(settings))
    return profile


def _prepare_tiles(work: Path, config: dict) -> None:
    """source -> pairs -> tiles locally (fast), so only the training goes through Slurm."""
    result = snakemake(work, config, "results/tiles/train.zarr", "results/tiles/val.zarr",
                       profile=None)
    assert result.returncode == 0, explain(result, work)


def _slurm_job_of(rule: str, timeout: float = 300) -> str:
    """The id of the running Slurm job of `rule` (the plugin puts rule_<name> in the comment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i %k"], capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            jobid, _, comment = line.partition(" ")
            if comment.strip() == f"rule_{rule}":
                return jobid
        time.sleep(0.5)
    raise AssertionError(f"no running Slurm job for rule {rule} within {timeout} s")


def test_training_preempted_by_usr1_resumes_to_the_uninterrupted_parameters(
        slurm_cluster, tmp_path):
    # 300 training steps; USR1 (what --signal=USR1@N sends before the time limit) arrives once
    # the first validation has saved a state, so the job stops mid-run on any machine's speed
    config = {**TINY, "train": {**TINY["train"], "epochs": 60}}
    work, reference = tmp_path / "slurm", tmp_path / "reference"
    _prepare_tiles(work, config)
    shutil.copytree(work, reference, symlinks=True)

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "config.yaml"), "--profile", str(PROFILE),
           "results/model/checkpoint.pt"]
    run = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        jobid = _slurm_job_of("train")
        rank0 = work / "logs" / "train" / "rank0.log"
        deadline = time.monotonic() + 300
        while not (rank0.is_file() and "saved resumable state" in rank0.read_text()):
            assert time.monotonic() < deadline, "training never saved a state"
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", jobid], check=True)
        stdout, stderr = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
    result = subprocess.CompletedProcess(cmd, run.returncode, stdout, stderr)
    assert result.returncode == 0, explain(result, work)

    # attempt 1 saved and exited 75; `retries` resubmitted it; attempt 2 resumed mid-run
    jobs = submitted_rules(stderr)["train"]
    assert len(jobs) == 2 and jobid == jobs[0], (jobid, jobs)
    assert "Trying to restart job" in stderr
    log = rank0.read_text()
    stopped = re.search(r"resumed from \S+ at step (\d+) of (\d+)", log)
    assert stopped and 0 < int(stopped[1]) < int(stopped[2]) == 300, log[-2000:]
    first = (work / ".snakemake" / "slurm_logs" / "rule_train" / f"{jobid}.log").read_text()
    assert "returned non-zero exit status 75" in first, first[-2000:]

    # the same training without interruption (2 local ranks, same seed): same parameters
    ref_config = {**config, "parallel": {"processes": 2}}
    ref = snakemake(reference, ref_config, "results/model/checkpoint.pt", profile=None)
    assert ref.returncode == 0, explain(ref, reference)
    got = model_state(work / "results/model/checkpoint.pt")
    want = model_state(reference / "results/model/checkpoint.pt")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_signal_before_time_limit_saves_and_exits_75(slurm_cluster, tmp_path):
    """--signal=USR1@60 on a 3-minute job: Slurm warns the ranks, they save and exit 75.

    slurmctld sends the warning once, from its periodic time-limit check (every 30 s, up to
    30 s early), to the job steps that exist then: it must come after the srun step started
    (~20 s into a job here) and before the limit, so the test job asks for 3 minutes.
    """
    # far longer than 3 min, without early stopping
    config = {**TINY, "train": {**TINY["train"], "epochs": 5000, "patience": 0}}
    work = tmp_path / "limit"
    _prepare_tiles(work, config)
    profile = _derived_profile(tmp_path, runtime=3, slurm_extra="'--signal=USR1@60'")
    result = snakemake(work, config, "results/model/checkpoint.pt", "--retries", "0",
                       profile=profile)
    assert result.returncode != 0  # no retries left: the stop is reported as the job's error
    (jobid,) = submitted_rules(result.stderr)["train"]
    # stopped by the warning (job state FAILED: exit 75), not killed at the limit (TIMEOUT)
    assert f"SLURM-job '{jobid}' failed, SLURM status is: 'FAILED'" in result.stderr, (
        explain(result, work))
    assert "stopped by a signal at step" in (work / "logs" / "train.log").read_text()
    assert (work / "results" / "model" / "train_state" / "last").exists()


def test_training_spans_every_node_of_a_two_node_job(slurm_cluster, tmp_path):
    # nodes: 2 with 2 tasks per node must give 4 ranks: the jobstep removed SLURM_NNODES, and
    # a bare srun would start on one node only (2 ranks); downscaler.srun passes --nodes=2
    work = tmp_path / "two_nodes"
    _prepare_tiles(work, TINY)
    profile = _derived_profile(tmp_path, nodes=2)
    result = snakemake(work, TINY, "results/model/checkpoint.pt", profile=profile)
    assert result.returncode == 0, explain(result, work)
    for rank in range(4):
        text = (work / "logs" / "train" / f"rank{rank}.log").read_text()
        assert "world 4, cpu" in text, text[:500]
    assert '"world_size": 4' in (work / "logs" / "train.log").read_text()


def test_failing_job_reports_its_error_and_slurm_log(slurm_cluster, tmp_path):
    work = tmp_path / "fail"
    raw = work / "results" / "raw"
    raw.mkdir(parents=True)
    for name in ("fields.nc", "static.nc"):  # not netCDF: the pairs job fails reading them
        (raw / name).write_text("not a netCDF file\n")
    result = snakemake(work, TINY, "results/pairs/coarse.nc", "--retries", "0")
    assert result.returncode != 0
    (jobid,) = submitted_rules(result.stderr)["pairs"]
    slurm_log = work / ".snakemake" / "slurm_logs" / "rule_pairs" / f"{jobid}.log"
    block = result.stderr[result.stderr.index("Error in rule pairs"):]
    assert f"SLURM-job '{jobid}' failed" in block
    assert f"logs/pairs.log, {slurm_log}" in block  # both logs named to the user
    assert "Error in rule pairs" in slurm_log.read_text()  # the job's own report
    assert "downscaler pairs: error:" in (work / "logs" / "pairs.log").read_text()


def test_pairs_regridded_by_dask_workers_running_as_slurm_jobs(slurm_cluster, tmp_path):
    # the pairs stage twice: local threads, and 2 dask workers that are Slurm jobs
    local, spread = tmp_path / "threads", tmp_path / "dask"
    config = {**TINY, "regrid": {"factor": 4, "time_chunk": 8}}  # 8 chunks to spread
    result = snakemake(local, config, "results/pairs/coarse.nc", profile=None)
    assert result.returncode == 0, explain(result, local)
    spread.mkdir()
    (spread / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "downscaler.cluster", "--workers", "2", "--cores", "1",
           "--memory", "1GB", "--walltime", "00:10:00", "--queue", "debug", "--",
           str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(spread),
           "--configfile", str(spread / "config.yaml"), "--cores", "2", "-p",
           "results/pairs/coarse.nc"]
    run = subprocess.run(cmd, cwd=spread, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, explain(run, spread)
    assert re.search(r"dask: 2 workers at tcp://", run.stderr), run.stderr[-3000:]
    assert '"scheduler": "tcp://' in run.stderr  # the pairs job was given the cluster
    counts = [int(n) for n in re.findall(r"tcp://\S+ (\d+)", run.stderr.split(
        "tasks run per worker:")[-1].splitlines()[0])]
    assert len(counts) == 2 and min(counts) > 0, counts  # both worker jobs did part of it
    import xarray as xr

    for name in ("coarse.nc", "fine.nc"):
        with xr.open_dataset(local / "results/pairs" / name) as a, \
                xr.open_dataset(spread / "results/pairs" / name) as b:
            # float32 block sums, added in another order on the workers: last-bit differences
            xr.testing.assert_allclose(a.load(), b.load(), rtol=1e-6, atol=1e-6)
