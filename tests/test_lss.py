"""LSS (Long-Sequence-Segmentation) sequence parallelism: every layout equals one process.

Spawned gloo processes run the tiny float64 Reslim of tests/parallel_cases.py with
``sp_mode: lss`` (local queries, keys and values all-gathered, reduce-scatter backward) alone and
with tensor parallel, FSDP2 and D-CHAG; forward outputs, losses, gathered gradients and
parameters after 3 AdamW steps must agree with a single process to 1e-10. The engine-level
cases (logged losses, checkpoint, resume) are in tests/test_engine.py.
"""

from __future__ import annotations

import pytest
from downscaler.model.reslim import ReslimConfig
from downscaler.parallel import Layout, LayoutError, spawn

from tests import parallel_cases as cases
from tests.test_parallel import _check, _run

WS2 = {"lss": ({"sp": 2, "sp_mode": "lss"}, False)}
WS4 = {
    "lss_x_tp": ({"sp": 2, "tp": 2, "sp_mode": "lss"}, True),
    "lss_x_fsdp": ({"sp": 2, "dp_shard": 2, "sp_mode": "lss"}, False),
    "lss_x_tp_dchag": ({"sp": 2, "tp": 2, "sp_mode": "lss", "dchag": "linear"}, False),
    "lss_4": ({"sp": 4, "sp_mode": "lss"}, False),
}


@pytest.fixture(scope="module")
def lss_ws2() -> dict[str, list[dict]]:
    return _run(2, WS2)


@pytest.fixture(scope="module")
def lss_ws4() -> dict[str, list[dict]]:
    return _run(4, WS4)


@pytest.mark.parametrize("name", list(WS2))
def test_lss_world_size_2(lss_ws2, name):
    _check(name, WS2[name][0], lss_ws2[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WS4))
def test_lss_world_size_4(lss_ws4, name):
    _check(name, WS4[name][0], lss_ws4[name])


def _cfg(num_heads: int, embed_dim: int = 32) -> ReslimConfig:
    return ReslimConfig(in_vars=["t2m", "tp"], out_vars=["t2m"], static_vars=["orog", "lsm"],
                        embed_dim=embed_dim, depth=2, num_heads=num_heads, mlp_ratio=4.0)


def test_lss_keeps_all_heads_so_only_tp_must_divide_them():
    # 2 heads over tp*sp = 4 ranks: impossible for Ulysses (heads split over sp), fine for LSS.
    Layout(tp=2, sp=2, sp_mode="lss").validate(4, _cfg(num_heads=2))
    with pytest.raises(LayoutError, match=r"num_heads=2 is not divisible by tp\*sp = 2\*2 = 4"):
        Layout(tp=2, sp=2).validate(4, _cfg(num_heads=2))
    with pytest.raises(LayoutError, match="num_heads=3 is not divisible by tp=2"):
        Layout(tp=2, sp=2, sp_mode="lss").validate(4, _cfg(num_heads=3, embed_dim=24))
    with pytest.raises(LayoutError, match="sp_mode must be 'ulysses' or 'lss'"):
        Layout.from_config({"sp": 2, "sp_mode": "ring"})


@pytest.mark.parametrize("mode", ["lss", "ulysses"])
def test_no_score_matrix_at_a_long_sequence(mode):
    # 8192 tokens over 2 ranks: LSS's scores for its 4096 queries x 8192 keys x 4 heads would be
    # 512 MiB in float32 (Ulysses': 2 heads x 8192^2, as much); SDPA's kernel never builds them
    tokens = 8192
    for res in spawn(cases.long_sequence_attention_peak, 2, mode, tokens, timeout=300):
        assert res["diff"] < 1e-5, res
        assert res["peak"] < tokens * tokens * 4 / 16, res  # far below even one L x L matrix
