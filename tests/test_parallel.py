"""Hybrid parallelism (issue 5): every layout computes the same function as one process.

Spawned gloo processes (world sizes 2 and 4) run a tiny float64 Reslim under each layout next to
a single-process reference built from the same seed; forward outputs, gradients gathered to full
tensors and parameters after 3 AdamW steps must agree to 1e-10. Cases of one world size share a
spawn (process start-up dominates on 2 cores); the per-rank code is in tests/parallel_cases.py.
"""

from __future__ import annotations

import pytest
from downscaler.model.reslim import ReslimConfig
from downscaler.parallel import Layout, LayoutError, spawn

from tests import parallel_cases as cases

TOL = 1e-10

# name -> (layout config, activation checkpointing)
WS2 = {
    "ddp": ({"dp_replicate": 2}, False),
    "fsdp": ({"dp_shard": 2}, False),
    "tp": ({"tp": 2}, False),
    "sp_ulysses": ({"sp": 2}, False),
    "tp_dchag_linear": ({"tp": 2, "dchag": "linear"}, False),
}
WS4 = {
    "hsdp": ({"dp_replicate": 2, "dp_shard": 2}, False),
    "tp_x_fsdp": ({"tp": 2, "dp_shard": 2}, True),
    "tp_x_sp": ({"tp": 2, "sp": 2}, True),
    "sp_x_ddp": ({"sp": 2, "dp_replicate": 2}, False),
    "tp_x_replicate": ({"tp": 2, "dp_replicate": 2}, False),
    "tp_x_sp_dchag_cross": ({"tp": 2, "sp": 2, "dchag": "cross"}, False),
}


def _run(world_size: int, table: dict) -> dict[str, list[dict]]:
    per_rank = spawn(cases.run_parity, world_size, list(table.values()), timeout=300)
    return {name: [r[i] for r in per_rank] for i, name in enumerate(table)}


@pytest.fixture(scope="module")
def parity_ws2() -> dict[str, list[dict]]:
    return _run(2, WS2)


@pytest.fixture(scope="module")
def parity_ws4() -> dict[str, list[dict]]:
    return _run(4, WS4)


def _check(name: str, config: dict, ranks: list[dict]) -> None:
    for rank, res in enumerate(ranks):
        where = f"{name} {config} rank {rank}"
        assert res["n_grads"] == res["n_params"] > 0, where
        assert res["moved"] > 1e-4, f"{where}: AdamW did not move the parameters"
        for key in ("out", "loss", "grad", "param"):
            assert res[key] < TOL, f"{where}: max |{key} - reference| = {res[key]:.3e}"


@pytest.mark.parametrize("name", list(WS2))
def test_parity_world_size_2(parity_ws2, name):
    _check(name, WS2[name][0], parity_ws2[name])


@pytest.mark.parametrize("name", list(WS4))
def test_parity_world_size_4(parity_ws4, name):
    _check(name, WS4[name][0], parity_ws4[name])


def test_tp_bias_and_error_paths():
    for rank, res in enumerate(spawn(cases.misc_checks, 2, timeout=300)):
        bias, errors = res["bias"], res["errors"]
        assert bias["local_heads"] == 2, rank
        for part in ("attn", "mlp"):
            # Correct: equal to one process. The pitfall (bias on every rank, tp*b) is ~1 away.
            assert bias[f"{part}_diff"] < TOL, (rank, part, bias)
            assert bias[f"{part}_naive_diff"] > 0.4, (rank, part, bias)
        assert bias["block_diff"] < TOL and bias["bias_grad_diff"] < TOL, (rank, bias)
        assert "9 tokens cannot be split over sp=2" in errors["sequence"]
        assert "(nearest: 8 or 10 tokens)" in errors["sequence"]
        assert "an sp that divides 9 (nearest: sp=1 or 3)" in errors["sequence"]
        assert "batch size 5 is not divisible" in errors["batch"]
        assert errors["mesh"].startswith("LayoutError") and "build_mesh" in errors["mesh"]
        assert "world size is 2" in errors["world"]


def test_spawn_returns_results_and_names_failed_rank():
    assert spawn(cases.sum_of_ranks, 2, 10, timeout=120) == [21.0, 21.0]
    with pytest.raises(RuntimeError) as info:
        spawn(cases.fail_on_rank_one, 2, timeout=120, grace=2.0)
    msg = str(info.value)
    assert "rank 1" in msg and "deliberate failure for the launch test" in msg


# ---------------------------------------------------------------- layout (no processes needed)
def _cfg(**kw) -> ReslimConfig:
    base = dict(
        in_vars=["t2m", "tp"],
        out_vars=["t2m"],
        static_vars=["orog", "lsm"],
        embed_dim=32,
        depth=2,
        num_heads=4,
        mlp_ratio=4.0,
    )
    return ReslimConfig(**{**base, **kw})


def test_layout_valid_and_world_size():
    layout = Layout(dp_replicate=2, dp_shard=2, tp=2, sp=2)
    assert layout.world_size == 16 and layout.dp == 4
    layout.validate(16, _cfg(num_heads=4))  # no error
    Layout(tp=2, dchag="cross").validate(2, _cfg())


def test_layout_validate_lists_every_problem_once():
    with pytest.raises(LayoutError) as info:
        Layout(tp=3, sp=2).validate(4, _cfg(embed_dim=32, num_heads=4, mlp_ratio=4.0))
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "4 problem(s)" in msg
    assert "= 6 but the world size is 4" in msg
    assert "num_heads=4 is not divisible by tp*sp" in msg
    assert "embed_dim=32 is not divisible by tp=3" in msg
    assert "MLP hidden size" in msg and "128" in msg


def test_layout_dchag_problems():
    with pytest.raises(LayoutError, match="needs tp > 1"):
        Layout(dchag="linear").validate(1, _cfg())
    with pytest.raises(LayoutError, match=r"2 \+ 1 = 3 over tp=2"):
        Layout(tp=2, dchag="cross").validate(2, _cfg(static_vars=["orog"]))
    with pytest.raises(LayoutError, match="dchag must be null"):
        Layout(tp=2, dchag="tree").validate(2, _cfg())


def test_layout_from_config():
    cfg = {"dp_replicate": 1, "dp_shard": 2, "tp": 2, "sp": 1, "dchag": None}
    assert Layout.from_config(cfg) == Layout(dp_shard=2, tp=2)
    assert Layout.from_config({}) == Layout()
    with pytest.raises(LayoutError) as info:
        Layout.from_config({"dp": 2, "tp": 2, "tpp": 1})
    assert "'dp'" in str(info.value) and "'tpp'" in str(info.value)
    with pytest.raises(LayoutError, match="tp must be an integer >= 1, got 0"):
        Layout.from_config({"tp": 0})
    with pytest.raises(LayoutError, match="mapping"):
        Layout.from_config([("tp", 2)])


def _par(**kw) -> dict:
    return {"engine": "torch", "processes": 1, "pp": 1, "dp_replicate": 0, "dp_shard": 1,
            "tp": 1, "sp": 1, "sp_mode": "ulysses", "dchag": None, "layout": "manual", **kw}


def test_uneven_layouts_name_the_numbers_and_the_nearest_valid_choice():
    from downscaler.parallel.layout import check_parallel_config

    cfg = _cfg(num_heads=4)
    with pytest.raises(LayoutError) as info:  # heads not divisible by tp
        check_parallel_config(_par(processes=6, tp=3), cfg)
    msg = str(info.value)
    assert "num_heads=4 is not divisible by tp*sp = 3*1 = 3" in msg
    assert "nearest valid choice for 6 processes is tp: 2, sp: 1, dp_shard: 1" in msg
    with pytest.raises(LayoutError) as info:  # Ulysses: heads not divisible by tp*sp
        check_parallel_config(_par(processes=8, sp=8), cfg)
    assert "tp*sp = 1*8 = 8" in str(info.value) and "tp: 1, sp: 4" in str(info.value)
    check_parallel_config(_par(processes=8, sp=8, sp_mode="lss"), cfg)  # LSS keeps whole heads
    with pytest.raises(LayoutError, match=r"dp_shard\*tp\*sp = 3 does not divide the 4 "
                                          r"processes; the nearest valid choice"):
        check_parallel_config(_par(processes=4, tp=3), cfg)


def test_uneven_pipelines_name_the_numbers_and_the_nearest_valid_choice():
    from downscaler.parallel.layout import check_parallel_config

    cfg = _cfg(depth=6)
    pipe = {"pp_schedule": "1f1b", "microbatches": 0}
    with pytest.raises(LayoutError) as info:  # blocks not divisible by stages
        check_parallel_config(_par(processes=4, pp=4, **pipe), cfg, batch_size=8)
    msg = str(info.value)
    assert "pp=4 pipeline stages cannot split depth=6 transformer blocks equally; the nearest " \
           "valid pp is 3 (valid: [1, 2, 3, 6])" in msg
    assert "the nearest valid choice for 4 processes is pp: 2, tp: 1, sp: 1, dp_shard: 1" in msg
    with pytest.raises(LayoutError) as info:  # micro-batches must divide the per-rank batch
        check_parallel_config(_par(processes=4, pp=2, **{**pipe, "microbatches": 3}), cfg,
                              batch_size=8)
    assert ("parallel.microbatches=3 does not divide the per-rank batch of 4 samples "
            "(train.batch_size / data-parallel ranks); the nearest valid choice is 2 "
            "(valid: [1, 2, 4])") in str(info.value)
    with pytest.raises(LayoutError, match=r"pp_schedule: 1f1b needs at least one micro-batch "
                                          r"per stage, but microbatches=1 < pp=2 \(per-rank "
                                          r"batch 1\); raise train.batch_size to at least 2"):
        check_parallel_config(_par(processes=4, pp=2, **pipe), cfg, batch_size=2)
    check_parallel_config(_par(processes=4, pp=2, **{**pipe, "pp_schedule": "gpipe"}), cfg,
                          batch_size=2)
    with pytest.raises(LayoutError, match=r"pp=2 composes with tp and dp_replicate \(plain "
                                          r"data parallelism\) only, not with dp_shard=2"):
        check_parallel_config(_par(processes=4, pp=2, dp_shard=2, **pipe), cfg, batch_size=8)
    check_parallel_config(_par(processes=8, pp=2, tp=2, **pipe), cfg, batch_size=8)  # pp x tp x dp


def test_uneven_sequence_message():
    from downscaler.parallel.sequence_parallel import uneven_sequence_message

    msg = uneven_sequence_message(9, 2)
    assert msg.startswith("sequence parallel: 9 tokens cannot be split over sp=2 ranks")
    assert "(nearest: 8 or 10 tokens)" in msg and "(nearest: sp=1 or 3)" in msg
    assert "(nearest: 4 tokens)" in uneven_sequence_message(3, 4)
