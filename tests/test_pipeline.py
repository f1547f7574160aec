"""Pipeline parallelism (parallel/pipeline.py): 2 (and 3) stages over the transformer blocks,
GPipe and 1F1B with micro-batches, and pp x dp (2 x 2), against one process in float64 (loss,
gradients and parameters after 3 AdamW steps to 1e-10), and the uneven-split error."""

from __future__ import annotations

import pytest
from downscaler.parallel import spawn
from downscaler.parallel.pipeline import check_stages

from tests import parallel_cases as cases

CASES = [("gpipe", 4), ("1f1b", 2)]


@pytest.fixture(scope="module")
def two_stages() -> list[list[dict]]:
    return spawn(cases.pipeline_cases, 2, CASES, timeout=300)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{s}_m{m}" for s, m in CASES])
def test_two_stage_pipeline_matches_one_process(two_stages, index):
    ranks = [r[index] for r in two_stages]
    owned = [set(r["owned"]) for r in ranks]
    assert not owned[0] & owned[1] and len(owned[0] | owned[1]) == ranks[0]["n_ref"]
    assert any(n.startswith("blocks.0.") for n in owned[0])
    assert any(n.startswith("blocks.1.") for n in owned[1]) and "head_conv.weight" in owned[1]
    for rank, res in enumerate(ranks):
        assert res["moved"] > 1e-4, (CASES[index], rank, res)
        assert res["grad"] < 1e-10 and res["param"] < 1e-10, (CASES[index], rank, res)
    assert ranks[1]["loss"] < 1e-10, ranks[1]["loss"]


def test_three_stages_pass_tokens_through_a_middle_stage():
    for rank, res in enumerate(spawn(cases.pipeline_cases, 3, [("1f1b", 4)], timeout=300)):
        res = res[0]
        assert res["moved"] > 1e-4 and res["grad"] < 1e-10 and res["param"] < 1e-10, (rank, res)
        assert {n.split(".")[1] for n in res["owned"] if n.startswith("blocks.")} == {str(rank)}
    assert res["loss"] < 1e-10


@pytest.mark.slow
def test_pipeline_x_data_parallel():
    # 4 processes: 2 data-parallel replicas of a 2-stage 1F1B pipeline, 2 samples each
    for rank, res in enumerate(spawn(cases.pipeline_cases, 4, [("1f1b", 2, 2)], timeout=300)):
        res = res[0]
        assert res["moved"] > 1e-4 and res["grad"] < 1e-10 and res["param"] < 1e-10, (rank, res)
        assert res["loss"] < 1e-10, (rank, res)


def test_blocks_not_divisible_by_stages_names_the_nearest_choice():
    with pytest.raises(ValueError, match=r"depth=6 transformer blocks cannot be split into 4 "
                                         r"equal stages; the nearest valid stage count is 3"):
        check_stages(6, 4)
    check_stages(6, 3)
