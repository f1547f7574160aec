"""The Frontier profile: planning the whole workflow, and the sbatch line of the training job."""

import base64
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent
SRUN = "srun --ntasks-per-node=8 --cpus-per-task=7 --gpus-per-task=1 --gpu-bind=closest"

pytest.importorskip("snakemake_executor_plugin_slurm",
                    reason="needs snakemake-executor-plugin-slurm (pip install it)")


def snakemake(workdir: Path, *args: str, env: dict | None = None):
    """Run the repository's Snakefile in `workdir` with the frontier profile."""
    (workdir / "frontier").mkdir(parents=True, exist_ok=True)
    for name in ("config.v8+.yaml", "env.sh"):  # `--profile frontier` looks in ./frontier
        shutil.copy(REPO / "frontier" / name, workdir / "frontier" / name)
    shutil.copy(REPO / "config.yaml", workdir / "config.yaml")
    env = {**os.environ, "SBATCH_ACCOUNT": "cli999", **(env or {})}
    env["PATH"] = f"{env.get('PATH_PREFIX', '')}{BIN}{os.pathsep}{os.environ['PATH']}"
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--profile", "frontier", *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)


def test_dry_run_plans_whole_workflow_with_multinode_training(tmp_path):
    result = snakemake(tmp_path, "-n", "-p")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    train = out[out.index("rule train:"):]
    train = train[:train.index("\n\n")]
    assert "slurm_account=cli999" in train  # expanded from $SBATCH_ACCOUNT
    assert "slurm_partition=batch" in train
    assert "nodes=2" in train and "tasks_per_node=8" in train and "cpus_per_task=7" in train
    assert "--gpus-per-task=1 --gpu-bind=closest" in train
    assert f"{SRUN} python -m downscaler.cli train" in train
    for rule in ("source", "pairs", "tiles", "infer_test", "evaluate"):
        assert f"rule {rule}:" in out


FAKE_SBATCH = """#!/bin/sh
# stand-in sbatch: record the command line and the script, then refuse like a full queue
printf '%s\\n' "$*" >> "{log}"
cat >> "{log}.script" 2>/dev/null
echo "sbatch: error: stand-in sbatch recorded the submission" >&2
exit 1
"""
FAKE_QUERY = """#!/bin/sh
# stand-in {name}: record the call, answer like Slurm with nothing to report
printf '%s %s\\n' "{name}" "$*" >> "{log}.queries"
{answer}
"""


def fake_slurm(bindir: Path, log: Path) -> None:
    bindir.mkdir()
    scripts = {"sbatch": FAKE_SBATCH.format(log=log)}
    answers = {"sacctmgr": "echo cli999", "sshare": "echo cli999", "sacct": "exit 0",
               "squeue": "exit 0", "scontrol": "exit 0", "srun": "exit 0", "sinfo": "exit 0"}
    for name, answer in answers.items():
        scripts[name] = FAKE_QUERY.format(name=name, log=log, answer=answer)
    for name, text in scripts.items():
        path = bindir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_submitted_training_job(tmp_path, pytestconfig):
    work = tmp_path / "work"
    # existing tile stores: only the training job is left to submit
    for split in ("train", "val"):
        (work / "results" / "tiles" / f"{split}.zarr").mkdir(parents=True)
    log = tmp_path / "sbatch.log"
    fake_slurm(tmp_path / "bin", log)
    result = snakemake(work, "results/model/checkpoint.pt", "--retries", "0",
                       env={"PATH_PREFIX": f"{tmp_path / 'bin'}{os.pathsep}"})
    assert result.returncode != 0  # the stand-in refuses the job after recording it
    calls = log.read_text().splitlines()
    assert len(calls) == 1, calls
    call = calls[0]
    for expected in ("-A cli999", "-p batch", "-t 120", "-C nvme", "--nodes=2",
                     "--ntasks-per-node=8", "--cpus-per-task=7",
                     "--gpus-per-task=1 --gpu-bind=closest --signal=USR1@300",
                     "--comment rule_train"):
        assert expected in call, (expected, call)
    for refused in ("--mem", "--ntasks=1", "--gres"):
        assert refused not in call, (refused, call)
    # inside the job, snakemake's jobstep runs the rule with the srun line as its `mpi` resource
    script = Path(f"{log}.script")
    submitted = call + (script.read_text() if script.exists() else "")
    assert "--target-jobs 'train:'" in submitted and "slurm-jobstep" in submitted
    resources = [base64.b64decode(token.removeprefix("base64//")).decode()
                 for token in re.findall(r"base64//[A-Za-z0-9+/=]+", submitted)]
    assert f"train:mpi='{SRUN}'" in resources, resources
