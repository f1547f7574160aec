"""Stopping the workflow (SIGTERM or Ctrl-C to Snakemake) makes a local training save and stop,
and the next run resumes from the saved state."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from downscaler.workflow_signals import is_training_command

from tests.conftest import REPO
from tests.test_workflow import BIN, TINY, run_snakemake


@pytest.mark.parametrize("argv, expected", [
    (["python", "-m", "downscaler.cli", "train", "--config", "{}"], True),
    (["/venv/bin/python3", "-u", "-m", "downscaler.cli", "train"], True),
    (["python", "-m", "downscaler.cli", "infer", "--config", "{}"], False),
    # Snakemake's shell around the rule: killing it would leave the training running
    (["/bin/bash", "-c", "set -euo pipefail;  python -m downscaler.cli train --config x"], False),
    (["python", "-c", "from multiprocessing.spawn import spawn_main; spawn_main()"], False),
])
def test_only_the_training_command_is_asked_to_stop(argv, expected):
    assert is_training_command(argv) is expected


def _start(workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2",
           "results/model/checkpoint.pt"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _saved_step(state: Path) -> int:
    return torch.load(state / "meta.pt", weights_only=False)["step"]


def _stop_after_a_save(workdir: Path, signum: int, after_step: int) -> int:
    """Run the training rule, send `signum` to Snakemake alone once a state past `after_step`
    is saved; check the rule failed with a resumable state kept; that state's step."""
    state = workdir / "results/model/train_state/last"
    proc = _start(workdir)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if _saved_step(state) > after_step:
                break
        except (FileNotFoundError, EOFError, RuntimeError, KeyError):
            pass  # not written yet, or being replaced
        time.sleep(0.1)
    assert proc.poll() is None, f"training ended before the signal:\n{proc.stderr.read()[-3000:]}"
    proc.send_signal(signum)  # to Snakemake only, not its process group
    _, stderr = proc.communicate(timeout=180)
    log = (workdir / "logs/train.log").read_text()
    assert proc.returncode != 0, stderr[-3000:]
    assert "stopped by a signal" in log and "resumable state saved" in log, log[-3000:]
    assert "exit status 75" in stderr, stderr[-3000:]
    assert not (workdir / "results/model/checkpoint.pt").exists()
    return _saved_step(state)


@pytest.mark.slow
def test_stopping_snakemake_saves_the_training_and_the_rerun_resumes(tmp_path):
    config = {**TINY, "train": {"epochs": 40, "batch_size": 16, "val_every_steps": 4,
                                "patience": 0}}
    workdir = tmp_path / "run"
    run_snakemake(workdir, config, "results/tiles/train.zarr", "results/tiles/val.zarr")

    first = _stop_after_a_save(workdir, signal.SIGTERM, after_step=0)
    second = _stop_after_a_save(workdir, signal.SIGINT, after_step=first)
    assert "resumed from" in (workdir / "logs/train/rank0.log").read_text()

    run_snakemake(workdir, config, "results/model/checkpoint.pt")
    summary = json.loads((workdir / "logs/train.log").read_text().strip().splitlines()[-1])
    assert summary["resumed_from"] == second > first > 0
    assert summary["steps"] > second
    assert (workdir / "results/model/checkpoint.pt").stat().st_size > 0
