"""Engine-level parity runs for tests/test_engine.py: the REAL training entry point
(``downscaler.train.run_rank``, what the CLI's launcher calls on every rank) under each layout.

Every case trains a tiny model a few steps with clipping that bites, validates an odd number of
tiles, is stopped in the middle (the same path as SIGTERM: save, ``TrainingInterrupted``) and
resumed; its logged losses, gradient norms and published checkpoint are then compared with one
process. Module level so ``launcher.spawn`` can pickle the functions; one spawned world runs many
cases in turn (process start-up dominates on 2 cores).
"""

from __future__ import annotations

import csv
import signal
from pathlib import Path
from typing import Any

import torch
from downscaler.config import validate_config
from downscaler.launcher import TrainingInterrupted

STOP_AT = 3  # of 6 steps: between the validations at steps 2 and 4
MODEL = {"preset": "tiny", "embed_dim": 16, "depth": 1, "num_heads": 4, "decoder_depth": 1,
         "residual_channels": 4}
PIPELINE_MODEL = {"depth": 4}  # the pipeline cases' override: 4 blocks split into 2 or 4 stages


def make_config(out: Path, parallel: dict, clip: float, processes: int, init: str,
                model: dict | None = None) -> dict:
    """The validated config of one run (2 variables + 2 statics: D-CHAG splits 4 channels),
    starting from the weights ``init``; ``model`` overrides keys of ``MODEL``."""
    train = {"init_from": init, "epochs": 3, "batch_size": 4, "workers": 0, "val_every_steps": 2,
             "log_every_steps": 1, "grad_clip": clip, "lr": 5e-3, "warmup_epochs": 0.5,
             "tv_weight": 0.02,  # the TV prior in the loss too (tolerances measured with it)
             "patience": 0, "precision": "fp32", "log_dir": str(out / "logs")}
    return validate_config({
        "seed": 11, "model": {**MODEL, **(model or {})}, "train": train,
        "variables": ["2m_temperature", "total_precipitation"],
        "statics": ["orography", "land_sea_mask"],
        "parallel": {"processes": processes, "device": "cpu", **parallel}})


class StopAt:
    """Stop (as on SIGTERM) before training step ``step``; the loop's ``stop`` hook."""

    def __init__(self, step: int) -> None:
        self.step = step

    def requested(self, step: int) -> bool:
        return step >= self.step


def read_run(out: Path) -> dict[str, Any]:
    """What a finished run published: the metrics CSV and the best checkpoint's weights."""
    with open(out / "model" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    payload = torch.load(out / "model" / "checkpoint.pt", map_location="cpu", weights_only=False)
    log = out / "logs" / "rank0.log"
    return {"rows": rows, "state": payload["model_state"], "dchag": payload.get("dchag"),
            "step": payload["step"], "val_loss": payload["val_loss"],
            "log": log.read_text() if log.exists() else ""}


def run_case(out: Path, config: dict, stores: tuple[str, str], dtype: torch.dtype,
             interrupt: bool = True) -> dict[str, Any]:
    """Train ``config`` on this rank (stopped at ``STOP_AT`` and resumed when ``interrupt``);
    returns the summary and, on rank 0, the published outputs."""
    from downscaler.train import run_rank

    torch.set_default_dtype(dtype)
    try:
        paths = (*stores, str(out / "model" / "checkpoint.pt"), str(out / "model" / "log.csv"))
        device = torch.device("cpu")
        stopped = None
        if interrupt:
            try:
                run_rank(device, config, *paths, stop=StopAt(STOP_AT))
            except TrainingInterrupted:
                stopped = torch.load(out / "model" / "train_state" / "last" / "meta.pt",
                                     weights_only=False)["step"]
        summary = run_rank(device, config, *paths)
    finally:
        torch.set_default_dtype(torch.float32)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    result = {"summary": summary, "stopped": stopped}
    if rank == 0:
        result.update(read_run(out))
    return result


def initial_weights(path: Path, model_overrides: dict | None = None) -> str:
    """A checkpoint of the test model with every weight perturbed, so that each part of the
    model (blocks, D-CHAG's private weights) carries a real share of the gradient norm: at the
    zero-ish initialisation the residual path dwarfs the rest and a wrong share would hide."""
    from downscaler.checkpoint import save_checkpoint
    from downscaler.model.presets import build_model

    torch.manual_seed(0)
    overrides = {k: v for k, v in {**MODEL, **(model_overrides or {})}.items() if k != "preset"}
    model = build_model("tiny", ["t2m", "tp"], ["t2m", "tp"], ["orog", "lsm"], mag=4,
                        **overrides)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    save_checkpoint(path, model)
    return str(path)


def fsdp_only_budget_gib(world: int) -> float:
    """A ``parallel.memory_gib`` between the planner's FSDP (dp_shard=world) and DDP estimates
    for the test model (float64, 16 tokens, global batch 4): ``layout: auto`` must choose FSDP."""
    from downscaler.model.presets import build_model
    from downscaler.parallel.layout import Layout
    from downscaler.parallel.planner import GIB, ModelSize, estimate_memory

    overrides = {k: v for k, v in MODEL.items() if k != "preset"}
    with torch.device("meta"):
        model = build_model("tiny", ["t2m", "tp"], ["t2m", "tp"], ["orog", "lsm"], mag=4,
                            **overrides)
    size = ModelSize.from_model(model)
    ddp, fsdp = (estimate_memory(size, 16, layout, 4 // world, False, 8, 8)["total"]
                 for layout in (Layout(dp_replicate=world), Layout(dp_shard=world)))
    assert fsdp < ddp
    return (ddp + fsdp) / 2 / GIB


def world_cases(rank: int, world: int, cases: list[dict], stores: tuple[str, str],
                root: str, init: str) -> dict[str, Any]:
    """Run every case of this world size in turn, in this one spawned world."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    results = {}
    for case in cases:
        out = Path(root) / case["name"]
        config = make_config(out, case["parallel"], case["clip"], world, case.get("init", init),
                             case.get("model"))
        results[case["name"]] = run_case(out, config, stores, case["dtype"])
    return results if rank == 0 else {}


def mixed_precision(rank: int, world: int) -> dict[str, Any]:
    """``precision: bf16`` under FSDP2: the engine sets FSDP2's MixedPrecisionPolicy (bf16
    all-gathers and compute, float32 gradient reduction), and a bf16 step trains."""
    from downscaler.model.presets import build_model
    from downscaler.parallel.engine import build_engine
    from downscaler.train_config import from_validated

    config = make_config(Path("."), {"dp_shard": 2}, 1.0, world, "")
    config["train"]["precision"] = "bf16"
    train, par = from_validated(config)
    torch.manual_seed(0)
    model = build_model("tiny", ["t2m", "tp"], ["t2m", "tp"], ["orog", "lsm"], mag=4,
                        **{k: v for k, v in MODEL.items() if k != "preset"})
    engine = build_engine(model, train, par, torch.device("cpu"), world)
    policies = {type(m).__name__: (m._get_fsdp_state()._mp_policy.param_dtype,
                                   m._get_fsdp_state()._mp_policy.reduce_dtype)
                for m in engine.model.modules() if hasattr(m, "_get_fsdp_state")}
    x, static = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = engine.model(x, static, 100.0)
    norm = engine.step(pred.float().square().mean())
    return {"policies": policies, "pred_dtype": pred.dtype, "norm": float(norm),
            "param_dtype": next(engine.model.parameters()).dtype}
