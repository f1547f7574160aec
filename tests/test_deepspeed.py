"""DeepSpeed engine parity: ZeRO 1/2/3 on 2 gloo processes vs plain single-process torch AdamW.

Each rank trains on its half of the batch; DeepSpeed averages the gradients, so with a mean loss
the update equals a full-batch single-process step. One spawn runs all three stages (the process
start-up and DeepSpeed's import dominate the runtime) and saves the weights; assertions run here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from downscaler.launcher import spawn
from downscaler.model.presets import build_model
from downscaler.model.reslim import Reslim
from downscaler.parallel.deepspeed_engine import (
    DEEPSPEED_VERSION,
    build_deepspeed_engine,
    deepspeed_config,
    full_state_dict,
    load_checkpoint,
    save_checkpoint,
    train_step,
)

STAGES = (1, 2, 3)
STEPS, BATCH, RES_KM = 3, 4, 50.0
SECTION = {"lr": 1e-2, "weight_decay": 1e-2, "betas": [0.9, 0.99], "grad_clip": 0.0}


def tiny_model() -> Reslim:
    torch.manual_seed(0)
    return build_model(
        "tiny",
        ["t2m", "tp"],
        ["t2m", "tp"],
        ["orog"],
        embed_dim=16,
        depth=1,
        num_heads=2,
        decoder_depth=1,
        residual_channels=4,
        mag=2,
    )


def batches() -> list[tuple[torch.Tensor, ...]]:
    """``STEPS`` full batches ``(x, static, res_km, y)``."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, 2, 4, 4, generator=gen)
        static = torch.randn(BATCH, 1, 8, 8, generator=gen)
        y = torch.randn(BATCH, 2, 8, 8, generator=gen)
        out.append((x, static, RES_KM, y))
    return out


def plain_adamw() -> dict[str, torch.Tensor]:
    """The plain single-process loop on the full batches."""
    model = tiny_model()
    opt = torch.optim.AdamW(
        model.parameters(), lr=SECTION["lr"], betas=SECTION["betas"],
        weight_decay=SECTION["weight_decay"],
    )  # fmt: skip
    for x, static, res, y in batches():
        opt.zero_grad()
        F.mse_loss(model(x, static, res), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world: int, out_dir: str) -> None:
    """Every ZeRO stage in turn on this rank's half of each batch, plus a checkpoint round trip
    (inside the launcher's process group, which also exports the RANK/... variables DeepSpeed
    reads)."""
    half = BATCH // world
    rows = slice(rank * half, (rank + 1) * half)
    local = [(x[rows], s[rows], r, y[rows]) for x, s, r, y in batches()]
    results = {}
    for stage in STAGES:
        engine = build_deepspeed_engine(
            tiny_model(), {**SECTION, "zero_stage": stage, "micro_batch_size": half}
        )
        losses = [train_step(engine, b, F.mse_loss) for b in local[:-1]]
        ckpt = Path(out_dir) / f"ckpt_stage{stage}"
        save_checkpoint(engine, ckpt)
        losses.append(train_step(engine, local[-1], F.mse_loss))
        final = full_state_dict(engine)
        # Resume: a fresh engine loads the step-2 checkpoint and redoes step 3.
        resumed = build_deepspeed_engine(
            tiny_model(), {**SECTION, "zero_stage": stage, "micro_batch_size": half}
        )
        load_checkpoint(resumed, ckpt)
        resumed_loss = train_step(resumed, local[-1], F.mse_loss)
        results[stage] = {
            "state": final,
            "losses": losses,
            "resumed_state": full_state_dict(resumed),
            "resumed_loss": resumed_loss,
        }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ds_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("deepspeed")
    spawn(_worker, 2, str(out), timeout=600)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_matches_plain_adamw(ds_results, stage) -> None:
    want = plain_adamw()
    start = tiny_model().state_dict()
    for res in ds_results:
        got = res[stage]["state"]
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
        moved = max((got[n] - start[n]).abs().max().item() for n in want)
        assert moved > 1e-3  # the parameters did train, so the comparison is not vacuous


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_resume_reproduces_the_last_step(ds_results, stage) -> None:
    for res in ds_results:
        r = res[stage]
        assert r["resumed_loss"] == pytest.approx(r["losses"][-1], rel=1e-6)
        for name, value in r["state"].items():
            torch.testing.assert_close(r["resumed_state"][name], value, rtol=0, atol=0, msg=name)


def test_config_translation() -> None:
    ds = deepspeed_config(
        {"zero_stage": 2, "lr": 5e-4, "betas": [0.9, 0.95], "grad_clip": 1.0,
         "micro_batch_size": 3},
        world_size=4,
    )  # fmt: skip
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["train_batch_size"] == 12
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["lr"] == 5e-4
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["gradient_clipping"] == 1.0
    assert "gradient_clipping" not in deepspeed_config({})


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3"):
        deepspeed_config({"zero_stage": 4})
    with pytest.raises(ValueError, match=r"unknown deepspeed config key\(s\) \['stage'\]"):
        deepspeed_config({"stage": 1})
    with pytest.raises(ValueError, match="deepspeed.lr"):
        deepspeed_config({"lr": -1})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bf16"):
            deepspeed_config({"bf16": True})


def test_missing_deepspeed_says_how_to_install(monkeypatch) -> None:
    import downscaler.parallel.deepspeed_engine as engine_mod

    real = engine_mod.importlib.import_module

    def fake_import(name: str, *args):
        if name == "deepspeed":
            raise ImportError("No module named 'deepspeed'")
        return real(name, *args)

    monkeypatch.setattr(engine_mod.importlib, "import_module", fake_import)
    with pytest.raises(ImportError, match=f"pip install deepspeed=={DEEPSPEED_VERSION}"):
        build_deepspeed_engine(tiny_model(), {})
