"""The launcher: Slurm node lists, rank layout from SLURM_*/torchrun variables, local spawning."""

import pytest
from downscaler.launcher import (
    DEFAULT_PORT,
    LaunchError,
    backend_for,
    detect,
    expand_nodelist,
    from_slurm,
)

SRUN_TASK = {  # what srun sets for task 11 of `srun -N 2 -n 16` in job 123456
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "11",
    "SLURM_LOCALID": "3",
    "SLURM_NTASKS": "16",
    "SLURM_STEP_NUM_TASKS": "16",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    "SLURM_JOB_NODELIST": "frontier[00012-00013]",
    "SLURM_STEP_NODELIST": "frontier[00012-00013]",
}


@pytest.mark.parametrize("nodelist, hosts", [
    ("frontier00012", ["frontier00012"]),
    ("frontier[00012-00014,00020]",
     ["frontier00012", "frontier00013", "frontier00014", "frontier00020"]),
    ("login1,frontier[08-10]", ["login1", "frontier08", "frontier09", "frontier10"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("nid[009-011],nid100", ["nid009", "nid010", "nid011", "nid100"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["frontier[1-", "frontier]1[", "n[5-3]", "n[a-b]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(LaunchError, match="malformed Slurm node list"):
        expand_nodelist(bad)


def test_srun_task_layout_and_rendezvous():
    denv = from_slurm(SRUN_TASK)
    assert (denv.rank, denv.world_size, denv.local_rank, denv.local_world_size) == (11, 16, 3, 8)
    assert denv.master_addr == "frontier00012"  # the first node of the step
    assert denv.master_port == DEFAULT_PORT + 123456 % 10000
    assert denv.source == "slurm"
    # an explicit MASTER_PORT (e.g. from frontier/env.sh) wins over the derived one
    assert from_slurm({**SRUN_TASK, "MASTER_PORT": "31000"}).master_port == 31000


def test_batch_script_is_not_a_rank():
    # the batch shell sees SLURM_NTASKS=16 but is one process: it must not wait for 15 peers
    batch = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")}
    assert from_slurm(batch) is None
    assert detect(batch) is None


def test_slurm_errors_name_the_variable():
    with pytest.raises(LaunchError, match="SLURM_PROCID"):
        from_slurm({**SRUN_TASK, "SLURM_PROCID": "16"})
    with pytest.raises(LaunchError, match="SLURM_STEP_NUM_TASKS"):
        from_slurm({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "sixteen"})
    no_nodes = {k: v for k, v in SRUN_TASK.items() if "NODELIST" not in k}
    with pytest.raises(LaunchError, match="NODELIST"):
        from_slurm(no_nodes)


def test_torchrun_variables_win_and_need_a_rendezvous():
    env = {**SRUN_TASK, "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
           "MASTER_ADDR": "node7", "MASTER_PORT": "29999"}
    denv = detect(env)
    assert (denv.source, denv.rank, denv.world_size, denv.master_addr) == (
        "torchrun", 1, 4, "node7")
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        detect({"RANK": "0", "WORLD_SIZE": "2"})
    assert detect({}) is None  # a plain local run: the launcher spawns processes itself


def test_backends():
    assert backend_for("cpu") == "gloo"
    assert backend_for("cuda") == "nccl"


def _group_size(device):
    import torch.distributed as dist

    return str(device), dist.is_initialized() and dist.get_world_size()


def test_one_local_process_runs_inside_a_group_of_one():
    """The one launcher's contract: ``fn`` always runs inside a process group (gloo at world 1),
    which it leaves afterwards, restoring the rendezvous variables."""
    import os

    import torch.distributed as dist
    from downscaler.launcher import launch

    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    assert launch(_group_size, 1, "cpu") == ("cpu", 1)
    assert not dist.is_initialized()
    assert {k: os.environ.get(k) for k in before} == before
