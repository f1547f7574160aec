"""Engine-level parity: every layout through the real training entry point against one process.

Each case (tests/engine_cases.py) trains 6 steps with clipping that bites, validates 5 tiles (odd:
the data-parallel ranks get padded shards), is stopped at step 3 and resumed; its logged train
losses, gradient norms, validation losses and published best checkpoint must equal a
single-process run of the same config: to 1e-10 in float64 for the torch engine (DDP, FSDP2,
HSDP, TP, SP (Ulysses and LSS) and their combinations, D-CHAG linear, cross and tree-cross
with TP and FSDP, ``parallel.layout: auto``, pipelines of 2 and 4 stages (GPipe and 1F1B, 4
blocks) alone and with TP and DDP: their stop at step 3 and resume is the pipeline's resume
test), to float32
rounding for DeepSpeed ZeRO 1-3 (its engine trains in float32: logged numbers to 5e-6, weights
to rtol 2e-3 / atol 1e-5). D-CHAG is compared with the
single-process D-CHAG model (``parallel.dchag.reference_model``), the model its checkpoint holds.
Two spawned worlds (2 and 4 processes) run all their cases in turn.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from downscaler.launcher import spawn
from downscaler.pairs import compute_stats, make_pairs
from downscaler.tiles_store import write_tiles

from tests import engine_cases as cases
from tests.conftest import random_fields

F64, F32 = torch.float64, torch.float32
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None  # pinned in envs/
CLIP = 1.0
WORLD2 = [
    {"name": "ddp", "parallel": {}},
    {"name": "fsdp", "parallel": {"dp_shard": 2}},
    {"name": "tp", "parallel": {"tp": 2}},
    {"name": "sp", "parallel": {"sp": 2}},
    {"name": "lss", "parallel": {"sp": 2, "sp_mode": "lss"}},
    {"name": "dchag_linear_tp", "parallel": {"tp": 2, "dchag": "linear"}},
    {"name": "dchag_cross_tp", "parallel": {"tp": 2, "dchag": "cross"}},
    {"name": "dchag_tree_cross_tp", "parallel": {"tp": 2, "dchag": "tree-cross"}},
    {"name": "auto", "parallel": {"layout": "auto"}},
    {"name": "auto_fsdp",
     "parallel": {"layout": "auto", "memory_gib": cases.fsdp_only_budget_gib(2)}},
    {"name": "pp_gpipe", "parallel": {"pp": 2, "pp_schedule": "gpipe", "microbatches": 4},
     "model": cases.PIPELINE_MODEL},
    *({"name": f"zero{k}", "parallel": {"engine": "deepspeed", "zero_stage": k}, "dtype": F32}
      for k in (1, 2, 3) if HAS_DEEPSPEED),
]
WORLD4 = [
    {"name": "hsdp", "parallel": {"dp_replicate": 2, "dp_shard": 2}},
    {"name": "tp_sp", "parallel": {"tp": 2, "sp": 2}},
    {"name": "lss_fsdp", "parallel": {"dp_shard": 2, "sp": 2, "sp_mode": "lss"}},
    {"name": "dp_tp", "parallel": {"dp_replicate": 2, "tp": 2}},
    {"name": "dp_sp", "parallel": {"dp_replicate": 2, "sp": 2}},
    {"name": "fsdp_tp", "parallel": {"dp_shard": 2, "tp": 2}},
    {"name": "dchag_linear_fsdp", "parallel": {"dp_shard": 2, "tp": 2, "dchag": "linear"}},
    {"name": "dchag_cross_fsdp", "parallel": {"dp_shard": 2, "tp": 2, "dchag": "cross"}},
    {"name": "pp4_1f1b", "parallel": {"pp": 4}, "model": cases.PIPELINE_MODEL},
    {"name": "pp_tp", "parallel": {"pp": 2, "tp": 2}, "model": cases.PIPELINE_MODEL},
    {"name": "pp_dp", "parallel": {"pp": 2, "dp_replicate": 2, "pp_schedule": "gpipe"},
     "model": cases.PIPELINE_MODEL},
]
_AUTO = {"dp_replicate": 1, "dp_shard": 1, "tp": 1, "sp": 1, "sp_mode": "ulysses",
         "dchag": None, "activation_checkpointing": False, "pp": 1}
# what `layout: auto` must choose on 2 processes: plain DDP when memory is plentiful, FSDP when
# the budget (memory_gib) lies between the FSDP and DDP estimates
AUTO_CHOICE = {"auto": {**_AUTO, "dp_replicate": 2}, "auto_fsdp": {**_AUTO, "dp_shard": 2}}
for _case in (*WORLD2, *WORLD4):
    _case.setdefault("dtype", F64)
    _case["clip"] = CLIP


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[str, str]:
    """8 train tiles and 5 validation tiles (one 8x8 coarse tile a day: 16 tokens of 2x2)."""
    root = tmp_path_factory.mktemp("engine_tiles")
    fields, static = random_fields(n_time=13, n_lat=16, n_lon=16, seed=21)
    fine, coarse = make_pairs(fields, static, factor=4)
    stats = compute_stats(fine.isel(time=slice(0, 8)), ["t2m", "tp", "orog", "lsm"])
    tiling = {"div_lat": 1, "div_lon": 1, "halo": 2, "pad_mode": "symmetric"}
    paths = []
    for split, sl in (("train", slice(0, 8)), ("val", slice(8, 13))):
        path = root / f"{split}.zarr"
        write_tiles(fine.isel(time=sl), coarse.isel(time=sl), ["t2m", "tp"], ["orog", "lsm"],
                    stats, tiling, str(path))
        paths.append(str(path))
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def init(tmp_path_factory) -> str:
    return cases.initial_weights(tmp_path_factory.mktemp("engine_init") / "init.pt")


@pytest.fixture(scope="module")
def init_pp(tmp_path_factory) -> str:
    """The initial weights of the pipeline cases' 4-block model."""
    return cases.initial_weights(tmp_path_factory.mktemp("engine_init_pp") / "init.pt",
                                 cases.PIPELINE_MODEL)


def _reference(root: Path, stores, init: str, dtype: torch.dtype,
               dchag: str | None = None, model: dict | None = None) -> dict:
    """One process, the same config; for D-CHAG the single-process D-CHAG model (what
    ``apply_dchag`` on 2 ranks computes, built from the same initial model)."""
    import downscaler.train as train_mod
    from downscaler.parallel.dchag import reference_model

    build = train_mod.build_engine
    if dchag is not None:
        def patched(base, *args, **kwargs):
            return build(reference_model(base, 2, dchag), *args, **kwargs)
        train_mod.build_engine = patched
    try:
        config = cases.make_config(root, {}, CLIP, 1, init, model)
        return cases.run_case(root, config, stores, dtype, interrupt=False)
    finally:
        train_mod.build_engine = build


@pytest.fixture(scope="module")
def references(stores, init, init_pp, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("engine_reference")
    return {"f64": _reference(root / "f64", stores, init, F64),
            "pp": _reference(root / "pp", stores, init_pp, F64, model=cases.PIPELINE_MODEL),
            "f32": _reference(root / "f32", stores, init, F32),
            "linear": _reference(root / "linear", stores, init, F64, "linear"),
            "cross": _reference(root / "cross", stores, init, F64, "cross"),
            "tree-cross": _reference(root / "tree-cross", stores, init, F64, "tree-cross")}


def _world(world: int, table: list[dict], stores, init: str, init_pp: str, root: Path) -> dict:
    table = [{**c, "init": init_pp} if "model" in c else c for c in table]
    return spawn(cases.world_cases, world, table, stores, str(root), init, timeout=600)[0]


def _want(references: dict, case: dict) -> dict:
    """The single-process run a case must match."""
    if "model" in case:
        return references["pp"]
    return references[case["parallel"].get("dchag") or ("f64" if case["dtype"] == F64
                                                        else "f32")]


@pytest.fixture(scope="module")
def world2(stores, init, init_pp, tmp_path_factory) -> dict:
    return _world(2, WORLD2, stores, init, init_pp, tmp_path_factory.mktemp("engine_world2"))


@pytest.fixture(scope="module")
def world4(stores, init, init_pp, tmp_path_factory) -> dict:
    return _world(4, WORLD4, stores, init, init_pp, tmp_path_factory.mktemp("engine_world4"))


def _numbers(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r[key]]


def _check(got: dict, want: dict, case: dict) -> None:
    exact = case["dtype"] == F64
    # measured: float64 4e-16 (logged) / 5e-13 (weights); DeepSpeed float32 1.4e-7 / up to 9e-5
    # absolute on a few small biases (Adam amplifies float32 rounding where gradients are near
    # its eps; which biases depends on the data's last bits, e.g. the regridding's summation order)
    rel, abs_ = (1e-10, 1e-12) if exact else (5e-6, 1e-7)
    w_rtol, w_atol = (1e-9, 1e-11) if exact else (2e-3, 1e-4)
    assert got["stopped"] == cases.STOP_AT and got["summary"]["resumed_from"] == cases.STOP_AT
    assert got["summary"]["steps"] == want["summary"]["steps"] == 6
    for key in ("train_loss", "val_loss", "grad_norm"):
        ours, theirs = _numbers(got["rows"], key), _numbers(want["rows"], key)
        assert [s for s, _ in ours] == [s for s, _ in theirs], key
        for (step, a), (_, b) in zip(ours, theirs, strict=True):
            assert a == pytest.approx(b, rel=rel, abs=abs_), (key, step)
    assert [s for s, _ in _numbers(want["rows"], "val_loss")] == [2, 4, 6]
    assert got["step"] == want["step"]
    assert got["state"].keys() == want["state"].keys()
    for name, value in want["state"].items():
        torch.testing.assert_close(got["state"][name].to(value.dtype), value,
                                   rtol=w_rtol, atol=w_atol, msg=name)


def test_clipping_bites_in_the_reference(references):
    norms = [n for _, n in _numbers(references["f64"]["rows"], "grad_norm")]
    assert len(norms) == 6 and all(math.isfinite(n) for n in norms)
    assert sum(n > CLIP for n in norms) >= 3  # the clip changes most steps


@pytest.mark.slow
@pytest.mark.parametrize("case", WORLD2, ids=[c["name"] for c in WORLD2])
def test_two_process_layout_matches_one_process(world2, references, case):
    name = case["name"]
    want = _want(references, case)
    got = world2[name]
    if case["parallel"].get("dchag"):
        assert got["dchag"] == {"variant": case["parallel"]["dchag"], "tp": 2}
    if name in AUTO_CHOICE:  # the planner's choice and reason are in the run's log
        assert f"parallel.layout auto: {AUTO_CHOICE[name]}" in got["log"]
        assert "planner's reason: " in got["log"]
    _check(got, want, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", WORLD4, ids=[c["name"] for c in WORLD4])
def test_four_process_layout_matches_one_process(world4, references, case):
    _check(world4[case["name"]], _want(references, case), case)


def test_bf16_fsdp_gets_a_mixed_precision_policy():
    for result in spawn(cases.mixed_precision, 2, timeout=300):
        assert result["policies"] == {"FSDPBlock": (torch.bfloat16, torch.float32),
                                      "FSDPReslim": (torch.bfloat16, torch.float32)}
        assert result["pred_dtype"] == torch.bfloat16 and math.isfinite(result["norm"])
        assert result["param_dtype"] == torch.float32  # sharded master weights stay fp32
