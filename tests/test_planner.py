"""Layout planner (parallel/planner.py): its memory estimate against measured peak memory of
small CPU runs (within 2x, the planner's stated accuracy), and its choices."""

from __future__ import annotations

import pytest
from downscaler.launcher import spawn
from downscaler.parallel.layout import Layout
from downscaler.parallel.planner import (
    GIB,
    ModelSize,
    estimate_memory,
    main,
    plan_layout,
    tokens_per_tile,
)

from tests import planner_cases as cases

# (layout, coarse pixels per side, batch, activation checkpointing); tokens = (coarse / 2)^2
ONE_PROCESS = [({}, 16, 2, False), ({}, 32, 2, False), ({}, 32, 2, True)]
TWO_PROCESSES = [({"sp": 2, "sp_mode": "lss"}, 32, 2, False), ({"tp": 2}, 32, 2, False),
                 ({"pp": 2}, 32, 2, False)]


def _estimate(layout: dict, coarse: int, batch: int, ac: bool) -> float:
    size = ModelSize.from_preset("tiny", 4, 2, 2, **cases.MODEL)
    tokens = tokens_per_tile(coarse, coarse, size.cfg.patch_size)
    return estimate_memory(size, tokens, Layout.from_config(layout), batch, ac)["total"]


@pytest.mark.parametrize("case", ONE_PROCESS)
def test_estimate_within_2x_of_measured_one_process(case):
    measured = cases.measured_peak(0, 1, *case)
    ratio = _estimate(*case) / measured
    assert 0.5 < ratio < 2.0, (case, measured, ratio)


@pytest.mark.slow
def test_estimate_within_2x_of_measured_two_processes():
    peaks = {}
    for case in TWO_PROCESSES:
        peaks[str(case[0])] = spawn(cases.measured_peak, 2, *case, timeout=300)
        ratio = _estimate(*case) / max(peaks[str(case[0])])
        assert 0.5 < ratio < 2.0, (case, peaks, ratio)
    # the estimate follows the measurement: sharding the sequence, or the blocks over pipeline
    # stages, lowers both
    one = cases.measured_peak(0, 1, {}, 32, 2, False)
    for layout in ({"sp": 2, "sp_mode": "lss"}, {"pp": 2}):
        assert max(peaks[str(layout)]) < one, layout
        assert _estimate(layout, 32, 2, False) < _estimate({}, 32, 2, False), layout


def test_small_model_gets_plain_data_parallel():
    size = ModelSize.from_preset("9.5M")
    plan = plan_layout(size, tokens=64 * 128, world=8, memory_bytes=64 * GIB)
    assert plan.layout == Layout(dp_replicate=8) and not plan.activation_checkpointing
    assert plan.memory["total"] <= 64 * GIB and "dp_replicate=8" in plan.reason


def test_large_model_is_sharded_to_fit_and_the_reason_says_why():
    size = ModelSize.from_preset("1B")
    tokens = tokens_per_tile(128, 256, 2) * 4
    plan = plan_layout(size, tokens, world=64, memory_bytes=32 * GIB)
    lay = plan.layout
    assert lay.world_size == 64 and plan.memory["total"] <= 32 * GIB
    assert lay.dp_shard * lay.tp * lay.sp > 1 or plan.activation_checkpointing
    assert "without" in plan.reason  # what each choice saves
    unsharded = estimate_memory(size, tokens, Layout(dp_replicate=64))["total"]
    assert unsharded > 32 * GIB  # so the plan had to shard


def test_lss_when_heads_do_not_split_over_the_sequence_group():
    # 1B has 24 heads; 131072 tokens on 64 ranks of 64 GiB need tp 4 x sp 8 = 32 model ranks,
    # and 32 does not divide 24: Ulysses cannot split the heads, LSS keeps them whole
    size = ModelSize.from_preset("1B")
    plan = plan_layout(size, 131072, world=64, memory_bytes=64 * GIB)
    assert (plan.layout.tp, plan.layout.sp, plan.layout.sp_mode) == (4, 8, "lss"), plan
    assert "sp_mode lss: num_heads does not divide by tp*sp" in plan.reason
    plan.layout.validate(64, size.cfg)


def test_nothing_fits_names_the_smallest_estimate():
    size = ModelSize.from_preset("10B")
    with pytest.raises(ValueError, match=r"no layout of 2 processes fits 1\.0 GiB per rank: the "
                                         r"smallest estimate is [0-9.]+ GiB"):
        plan_layout(size, 4096, world=2, memory_bytes=1 * GIB)


def test_cli_prints_the_plan(capsys):
    plan = main(["--preset", "126M", "--world", "4", "--memory-gib", "16",
                 "--coarse-pixels", "64x64"])
    out = capsys.readouterr().out
    assert "proposed parallel config:" in out and "reason:" in out
    assert plan.layout.world_size == 4


def test_global_batch_skips_layouts_that_cannot_split_it():
    size = ModelSize.from_preset("tiny", 4, 2, 2, **cases.MODEL)
    # 4 processes, global batch 2: dp 4 cannot take it, so some model parallelism is needed
    plan = plan_layout(size, 64, 4, 64 * GIB, global_batch=2)
    assert 2 % plan.layout.dp == 0 and plan.layout.dp < 4
    assert plan_layout(size, 64, 4, 64 * GIB, global_batch=4).layout.dp == 4  # plain DDP


def test_pipeline_when_the_model_does_not_fit_otherwise():
    # 3 heads (tp 2 cannot split them), 9 tokens (sp 2 cannot split them) and a global batch of
    # 2 on 4 processes (at most 2 data-parallel ranks): only pp 2 x dp 2 uses every rank, with
    # GPipe (1F1B needs 2 micro-batches of the 1 sample per rank)
    size = ModelSize.from_preset("tiny", 4, 2, 2, embed_dim=48, depth=4, num_heads=3)
    with pytest.raises(ValueError, match="no layout of 4 processes fits the model"):
        plan_layout(size, 9, 4, 64 * GIB, global_batch=2, pp_schedule="1f1b")
    plan = plan_layout(size, 9, 4, 64 * GIB, global_batch=2, pp_schedule="gpipe")
    assert plan.layout == Layout(pp=2, dp_replicate=2), plan
    assert plan.as_config()["pp"] == 2
    assert plan.reason.startswith("pp=2, dp_replicate=2, dp_shard=1, tp=1, sp=1: estimated ")
    assert "each stage holds 2 of 4 blocks" in plan.reason and "without pp: " in plan.reason
    # a stage holds half the blocks: less memory than the whole model on one rank
    whole = estimate_memory(size, 9, Layout(dp_replicate=2), 1)["total"]
    assert plan.memory["total"] < whole
    # with heads that split, tensor parallelism (less idle time than a bubble) wins
    size = ModelSize.from_preset("tiny", 4, 2, 2, embed_dim=48, depth=4, num_heads=4)
    assert plan_layout(size, 9, 4, 64 * GIB, global_batch=2,
                       pp_schedule="gpipe").layout == Layout(tp=2, dp_replicate=2)


def _config(parallel: dict) -> dict:
    from downscaler.config import validate_config

    return validate_config({
        "seed": 1, "model": {"preset": "tiny", "num_heads": 4},
        "variables": ["2m_temperature", "total_precipitation"],
        "statics": ["orography", "land_sea_mask"],
        "parallel": {"processes": 2, "device": "cpu", **parallel}})


def test_layout_auto_is_accepted_and_owns_the_layout_keys():
    from downscaler.config import ConfigError

    assert _config({"layout": "auto"})["parallel"]["layout"] == "auto"
    with pytest.raises(ConfigError, match=r"layout is 'auto'.*tp: 2"):
        _config({"layout": "auto", "tp": 2})
    with pytest.raises(ConfigError, match="layout: manual"):
        _config({"layout": "auto", "engine": "deepspeed"})
