"""The Frontier profile: the plan, the exact sbatch and srun lines, frontier/env.sh, the ROCm check.

The sbatch lines are the slurm executor plugin's own, recorded by a stand-in sbatch; the srun
lines inside the jobs are rendered with the plugin's jobstep functions (the ones its executor
calls), from the resources Snakemake evaluated for each rule.
"""

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
SRUN_OPTIONS = "--ntasks-per-node=8 --cpus-per-task=7 --gpus-per-task=1 --gpu-bind=closest"
LAUNCH = f"python -m downscaler.srun {SRUN_OPTIONS}"  # the train rule's `mpi` resource

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
           "--profile", "frontier",
           # the stand-in sbatch fails at once: do not wait the plugin's default 40 s to notice
           "--slurm-init-seconds-before-status-checks", "1", *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)


def rule_block(out: str, rule: str) -> str:
    """The dry-run paragraph of `rule`."""
    block = out[out.index(f"rule {rule}:"):]
    return block[:block.index("\n\n")]


def evaluated_resources(block: str) -> dict:
    """`resources: a=1, b=x y, ...` of a dry-run paragraph, integers as int."""
    line = next(ln for ln in block.splitlines() if ln.strip().startswith("resources:"))
    pairs = re.findall(r"(\w+)=(.*?)(?=, \w+=|$)", line.split("resources:", 1)[1].strip())
    return {k: int(v) if v.isdigit() else v for k, v in pairs}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> str:
    result = snakemake(tmp_path_factory.mktemp("dry"), "-n", "-p")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_dry_run_plans_whole_workflow_with_multinode_training(dry_run):
    train = rule_block(dry_run, "train")
    assert "slurm_account=cli999" in train  # expanded from $SBATCH_ACCOUNT
    assert "slurm_partition=batch" in train
    assert "nodes=2" in train and "tasks_per_node=8" in train and "cpus_per_task=7" in train
    assert "--gpus-per-task=1 --gpu-bind=closest --signal=USR1@300" in train
    assert f"{LAUNCH} python -m downscaler.cli train" in train
    for rule in ("source", "pairs", "tiles", "infer_test", "evaluate"):
        assert f"rule {rule}:" in dry_run


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
    assert f"train:mpi='{LAUNCH}'" in resources, resources


def submission(tmp_path: Path, target: str, inputs: list[str]) -> tuple[str, str]:
    """The sbatch command line (and script) the plugin builds for the job making `target`."""
    work = tmp_path / "work"
    for path in inputs:  # existing inputs: only the job of `target` is left to submit
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).touch()
    log = tmp_path / "sbatch.log"
    fake_slurm(tmp_path / "bin", log)
    result = snakemake(work, target, "--retries", "0", "--rerun-triggers", "mtime",
                       env={"PATH_PREFIX": f"{tmp_path / 'bin'}{os.pathsep}"})
    assert result.returncode != 0  # the stand-in refuses the job after recording it
    calls = log.read_text().splitlines()
    assert len(calls) == 1, (calls, result.stderr[-3000:])
    script = Path(f"{log}.script")
    return calls[0], script.read_text() if script.exists() else ""


def test_submitted_inference_job_asks_for_one_gpu(tmp_path):
    call, _ = submission(tmp_path, "results/downscaled/test.nc",
                         ["results/model/checkpoint.pt", "results/pairs/coarse.nc",
                          "results/pairs/fine.nc"])
    for expected in ("-A cli999", "-p batch", "-t 60", "--nodes=1", "--cpus-per-task=7",
                     "--gpus=1", "--comment rule_infer_test"):
        assert expected in call, (expected, call)
    for refused in ("--mem", "--ntasks", "--gpus-per-task", "-C "):
        assert refused not in call, (refused, call)


def test_submitted_cpu_job_is_one_task(tmp_path):
    call, _ = submission(tmp_path, "results/pairs/coarse.nc",
                         ["results/raw/fields.nc", "results/raw/static.nc"])
    for expected in ("-A cli999", "-p batch", "-t 30", "--nodes=1", "--ntasks=1",
                     "--cpus-per-task=7", "--comment rule_pairs"):
        assert expected in call, (expected, call)
    for refused in ("--mem", "--gpus", "-C "):
        assert refused not in call, (refused, call)


class _Resources(dict):
    """Snakemake's job.resources as the plugin's functions use it (.get and attributes)."""

    __getattr__ = dict.__getitem__


class _Job:
    def __init__(self, resources: dict, threads: int = 1):
        self.resources, self.threads = _Resources(resources), threads


def jobstep_srun(resources: dict, sbatch_gave_gpus: bool) -> str:
    """The srun line the plugin's jobstep executor runs a non-mpi rule with, inside its job.

    The options come from the jobstep's own functions; `sbatch_gave_gpus` stands for the
    SLURM_GPUS variable it reads (set in the job when sbatch had --gpus).
    """
    from snakemake_executor_plugin_slurm_jobstep import (
        get_cpu_setting,
        get_gpu_setting,
        get_node_setting,
    )

    job = _Job(resources)
    parts = ["srun -n1 --cpu-bind=q", get_cpu_setting(job, sbatch_gave_gpus),
             get_gpu_setting(job), get_node_setting(job)]
    return " ".join(p for p in parts if p)


def test_srun_lines_inside_the_jobs(dry_run):
    infer = evaluated_resources(rule_block(dry_run, "infer_test"))
    assert "mpi" not in infer and "slurm_extra" not in infer
    # the step itself gets the GPU: options in slurm_extra would reach sbatch only
    assert jobstep_srun(infer, sbatch_gave_gpus=True) == (
        "srun -n1 --cpu-bind=q --cpus-per-task=7 --gpus=1 --nodes=1")
    pairs = evaluated_resources(rule_block(dry_run, "pairs"))
    assert jobstep_srun(pairs, sbatch_gave_gpus=False) == (
        "srun -n1 --cpu-bind=q --cpus-per-task=7 --nodes=1")
    # training: the jobstep runs the rule's command itself, which starts with the mpi launcher
    train_block = rule_block(dry_run, "train")
    train = evaluated_resources(train_block)
    shell = train_block[train_block.index("Shell command: ") + len("Shell command: "):]
    assert shell.startswith(f"{train['mpi']} python -m downscaler.cli train") and (
        train["mpi"] == LAUNCH)
    # ... and downscaler.srun runs srun over the job's nodes (slurmctld's NumNodes, since the
    # jobstep removed SLURM_NNODES): nodes x 8 ranks, the allocation sbatch asked for
    from downscaler.srun import srun_command

    args = shell.split()[3:]  # after `python -m downscaler.srun`
    srun = srun_command(args, {"SLURM_JOB_ID": "42"},
                        lambda job: f"JobId={job} NumNodes={train['nodes']} NumCPUs=112")
    assert " ".join(srun).startswith(f"srun --nodes=2 {SRUN_OPTIONS} python -m downscaler.cli")
    assert train["nodes"] * train["tasks_per_node"] == 16 and train["tasks_per_node"] == 8


def test_local_test_profile_differs_only_in_site_values():
    """tests/slurm/profile (run against a real Slurm) is this profile with another site's values."""
    import yaml

    frontier = yaml.safe_load((REPO / "frontier" / "config.v8+.yaml").read_text())
    local = yaml.safe_load((REPO / "tests" / "slurm" / "profile" / "config.v8+.yaml").read_text())
    site_keys = {"jobs", "latency-wait", "slurm-status-command",
                 "slurm-init-seconds-before-status-checks"}
    for key in (frontier.keys() | local.keys()) - site_keys - {"default-resources",
                                                              "set-resources"}:
        assert frontier.get(key) == local.get(key), key
    assert frontier["set-resources"].keys() == local["set-resources"].keys()
    site_resources = {"slurm_account", "slurm_partition", "runtime", "nodes", "tasks_per_node",
                      "cpus_per_task", "constraint", "gpu", "slurm_extra", "mpi"}
    for rule, resources in frontier["set-resources"].items():
        assert set(resources) - {"gpu", "constraint"} == set(local["set-resources"][rule]) - {
            "gpu", "constraint"}, rule
        assert set(resources) <= site_resources, rule
    # the same launcher shape and the same resume path, with local counts and signal time
    f_train, l_train = frontier["set-resources"]["train"], local["set-resources"]["train"]
    for train in (f_train, l_train):
        assert train["mpi"].startswith("'python -m downscaler.srun --ntasks-per-node=")
        assert f"--ntasks-per-node={train['tasks_per_node']} " in train["mpi"]
        assert re.search(r"--signal=USR1@\d+", train["slurm_extra"])
        warning = int(re.search(r"USR1@(\d+)", train["slurm_extra"])[1])
        # Slurm checks time limits periodically and may send the warning up to a minute early,
        # or not at all if the limit comes first: at least 60 s, well inside the walltime
        assert 60 <= warning < train["runtime"] * 60 / 2


def _load_check_rocm():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_rocm", REPO / "frontier/check_rocm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rocm_check_names_a_cuda_build_and_a_mismatched_module():
    check = _load_check_rocm()
    assert check.problems("2.13.0+rocm7.2", "7.2.41134-abc", "/opt/rocm-7.2.0") == []
    (cuda,) = check.problems("2.13.0+cu128", None, "/opt/rocm-7.2.0")
    assert "CUDA build" in cuda and "torch.version.hip is None" in cuda and "+rocm7.2" in cuda
    (cpu,) = check.problems("2.13.0", None, None)
    assert "torch.version.hip is None" in cpu
    (other,) = check.problems("2.13.0+rocm7.2", "7.2.41134", "/opt/rocm-6.4.1")
    assert "ROCm 7.2" in other and "6.4" in other
    (missing,) = check.problems("2.13.0+rocm7.2", "7.2.41134", None)
    assert "module load rocm/7.2" in missing


def test_rocm_versions_agree_across_wheel_index_pin_and_module():
    text = (REPO / "envs" / "frontier.yaml").read_text()
    index = re.search(r"--extra-index-url https://download.pytorch.org/whl/rocm(\d+\.\d+)", text)
    pin = re.search(r"torch==(\d+\.\d+\.\d+)\+rocm(\d+\.\d+)", text)
    assert index and pin and index[1] == pin[2]
    requirements = (REPO / "envs" / "requirements.txt").read_text()
    assert f"torch=={pin[1]}\n" in requirements  # the same torch as everywhere else
    module = re.search(r'rocm/\$\{DOWNSCALER_ROCM_MODULE:-(\d+\.\d+)\.\d+\}',
                       (REPO / "frontier" / "env.sh").read_text())
    assert module and module[1] == pin[2]


ENV_STUBS = {
    "activate": "# stands in for conda: sourced by `source activate ENV`\n",
    "scontrol": "#!/bin/sh\n# stand-in: show hostnames\necho frontier00012\necho frontier00013\n",
}


def _source_env_sh(tmp_path: Path, python: str, extra_env: dict) -> subprocess.CompletedProcess:
    """Source frontier/env.sh in bash with `module`, conda and python stood in for."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, text in {**ENV_STUBS, "python": python}.items():
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    script = ("module() { :; }\n"
              f"source {REPO / 'frontier' / 'env.sh'} || {{ echo SOURCE-FAILED; exit 3; }}\n"
              "env\n")
    env = {"PATH": f"{bindir}{os.pathsep}/usr/bin:/bin", "USER": "tester",
           "SBATCH_ACCOUNT": "cli999", **extra_env}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=60)


def test_env_sh_sets_rccl_miopen_and_rendezvous(tmp_path):
    plugin = tmp_path / "ofi"
    (plugin / "lib").mkdir(parents=True)
    (plugin / "lib" / "librccl-net.so").touch()
    result = _source_env_sh(tmp_path, "#!/bin/sh\nexit 0\n",
                            {"AWS_OFI_RCCL_DIR": str(plugin), "SLURM_JOB_ID": "1234567",
                             "SLURM_JOB_NODELIST": "frontier[00012-00013]"})
    assert result.returncode == 0, result.stderr
    env = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert env["NCCL_SOCKET_IFNAME"] == "hsn0" and env["FI_CXI_ATS"] == "0"
    assert env["FI_CXI_DEFAULT_CQ_SIZE"] == "131072"
    assert env["LD_LIBRARY_PATH"].startswith(f"{plugin}/lib")
    assert env["MIOPEN_USER_DB_PATH"].startswith("/tmp/")  # node-local, not Lustre or home
    assert env["MASTER_ADDR"] == "frontier00012"  # the first node of the job
    assert env["MASTER_PORT"] == str(29500 + 1234567 % 10000)
    assert "librccl-net.so" not in result.stderr  # the plugin was found: no warning


def test_env_sh_stops_on_a_torch_without_rocm(tmp_path):
    # a python whose torch is PyPI's CUDA build: the check prints why and env.sh returns 1
    fake_python = f"""#!/bin/sh
cat > "{tmp_path}/torch.py" <<'PY'
__version__ = "2.13.0+cu128"
class version:
    hip = None
PY
PYTHONPATH="{tmp_path}" exec {sys.executable} "$@"
"""
    result = _source_env_sh(tmp_path, fake_python, {"ROCM_PATH": "/opt/rocm-7.2.0"})
    assert result.returncode == 3 and "SOURCE-FAILED" in result.stdout
    assert "torch 2.13.0+cu128 is a CUDA build (torch.version.hip is None)" in result.stderr
    assert "librccl-net.so" not in result.stderr  # stopped before the later checks
