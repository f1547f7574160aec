"""benchmarks/gpu_check.py (`make gpu-check`): its skip without a GPU, and its checks on CPU."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})}, cwd=REPO)


def test_without_a_gpu_it_says_so_and_exits_0():
    result = run(env={"CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert "no CUDA or ROCm GPU visible" in result.stdout and "skipped" in result.stdout


@pytest.mark.slow
def test_the_same_checks_pass_on_cpu_with_gloo():
    result = run("--device", "cpu", "--presets", "tiny", "--size", "8", "--batch", "2",
                 "--matmul-n", "128", "--layouts", "ddp", "tp")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for check in ("parity ddp", "parity tp", "bf16 + SDPA step", "matmul peak", "MFU tiny"):
        row = next(line for line in lines if line.strip().startswith(check))
        assert row.rstrip().endswith("ok"), row
