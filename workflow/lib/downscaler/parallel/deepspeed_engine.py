"""DeepSpeed as an alternative training engine, behind the same step interface as the plain loop.

The plain loop does ``loss = loss_fn(model(*inputs), target); loss.backward(); opt.step()`` with
torch AdamW. Here the same step runs through a DeepSpeed engine (ZeRO stage 0-3), built from the
small ``train.deepspeed`` config section this project uses:

    {"zero_stage": 2, "lr": 2e-3, "weight_decay": 1e-5, "betas": [0.9, 0.99], "grad_clip": 1.0,
     "bf16": false, "micro_batch_size": 4}

which ``deepspeed_config`` translates into a DeepSpeed config dict: AdamW (torch's own
implementation on CPU, so no kernel build and the same maths as the plain loop; DeepSpeed's fused
Adam on GPU), fp32 unless ``bf16`` is asked for and the device supports it. The process group is
whatever ``torch.distributed`` already has (gloo on CPU, nccl on GPU), so the launcher stays
separate from the engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DEEPSPEED_VERSION",
    "build_deepspeed_engine",
    "deepspeed_config",
    "full_state_dict",
    "load_checkpoint",
    "save_checkpoint",
    "train_step",
]

# The version this module is tested with (pinned in envs/; REFERENCE section 2).
DEEPSPEED_VERSION = "0.19.0"

DEFAULTS: dict[str, Any] = {
    "zero_stage": 0,
    "lr": 2e-3,
    "weight_decay": 1e-5,
    "betas": [0.9, 0.99],
    "eps": 1e-8,
    "grad_clip": 0.0,
    "bf16": False,
    "micro_batch_size": 1,
    "grad_accum_steps": 1,
    "torch_adam": None,  # None: torch AdamW on CPU, DeepSpeed's fused Adam on GPU
}


def _import_deepspeed() -> Any:
    """Import DeepSpeed or explain how to install it."""
    try:
        return importlib.import_module("deepspeed")
    except ImportError as err:
        raise ImportError(
            "the DeepSpeed engine needs the deepspeed package: "
            f"pip install deepspeed=={DEEPSPEED_VERSION} (or set train.engine to the plain loop)"
        ) from err


def deepspeed_config(section: dict[str, Any], *, world_size: int = 1) -> dict[str, Any]:
    """Translate this project's ``deepspeed`` config section into a DeepSpeed config dict.

    Unknown keys and out-of-range values raise ``ValueError`` naming the key and the fix.
    ``world_size`` sets ``train_batch_size = micro_batch_size * grad_accum_steps * world_size``
    (DeepSpeed insists the three agree).
    """
    if not isinstance(section, dict):
        raise TypeError(f"deepspeed config must be a dict, got {type(section).__name__}")
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown deepspeed config key(s) {unknown}; valid keys are {sorted(DEFAULTS)}"
        )
    cfg = {**DEFAULTS, **section}
    stage = cfg["zero_stage"]
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {stage!r}")
    betas = cfg["betas"]
    if not (isinstance(betas, Sequence) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise ValueError(f"deepspeed.betas must be two numbers in [0, 1), got {betas!r}")
    for key in ("lr", "weight_decay", "eps", "grad_clip"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"deepspeed.{key} must be a number >= 0, got {value!r}")
    for key in ("micro_batch_size", "grad_accum_steps"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"deepspeed.{key} must be an integer >= 1, got {value!r}")
    on_gpu = torch.cuda.is_available()
    bf16 = bool(cfg["bf16"])
    if bf16 and not (on_gpu and torch.cuda.is_bf16_supported()):
        raise ValueError(
            "deepspeed.bf16 is true but this machine has no bf16-capable GPU; set bf16: false "
            "(fp32) on CPU"
        )
    torch_adam = (not on_gpu) if cfg["torch_adam"] is None else bool(cfg["torch_adam"])
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg["micro_batch_size"],
        "gradient_accumulation_steps": cfg["grad_accum_steps"],
        "train_batch_size": cfg["micro_batch_size"] * cfg["grad_accum_steps"] * world_size,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(cfg["lr"]),
                "betas": [float(b) for b in betas],
                "eps": float(cfg["eps"]),
                "weight_decay": float(cfg["weight_decay"]),
                "torch_adam": torch_adam,
            },
        },
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # the project logs its own metrics
        "wall_clock_breakdown": False,
    }
    if stage == 3 and not on_gpu:
        # ZeRO-3's coalesced all-gather (persistent parameters after every step, and
        # GatheredParameters) launches one async all_gather per parameter and waits only for the
        # last ("wait ensures the operation is enqueued"): on a GPU the NCCL stream orders them,
        # but gloo runs them on its own threads, so on a busy machine a parameter could be read
        # from an uninitialised buffer (seen: 1e31 in residual.conv_out.weight after a resume).
        # The sequential gather waits for each one.
        ds["zero_optimization"]["stage3_allgather_sequential"] = True
    if cfg["grad_clip"] > 0:
        ds["gradient_clipping"] = float(cfg["grad_clip"])
    return ds


def build_deepspeed_engine(model: nn.Module, config: dict[str, Any]) -> Any:
    """Wrap ``model`` in a DeepSpeed engine (with its AdamW) from the ``deepspeed`` config section.

    ``torch.distributed`` must already be initialised (the launcher's job); every rank calls this
    with an identically initialised model. Returns the engine: call it like the model.
    """
    deepspeed = _import_deepspeed()
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(
            "build_deepspeed_engine needs torch.distributed initialised first; start the run "
            "through the launcher (downscaler.launcher) or call init_process_group"
        )
    ds_config = deepspeed_config(config, world_size=dist.get_world_size())
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        dist_init_required=False,
    )
    return engine


def train_step(
    engine: Any, batch: Sequence[Tensor | float], loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> float:
    """One optimisation step: ``loss_fn(engine(*batch[:-1]), batch[-1])``, backward, step.

    ``batch`` is the model inputs followed by the target (for Reslim: ``(x, static, res_km, y)``),
    as in the plain loop; tensors are moved to the engine's device. Returns the loss as a float.
    """
    if len(batch) < 2:
        raise ValueError("batch must be (*model_inputs, target), e.g. (x, static, res_km, y)")
    device = engine.device
    moved = [b.to(device) if isinstance(b, Tensor) else b for b in batch]
    *inputs, target = moved
    loss = loss_fn(engine(*inputs), target)
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def save_checkpoint(engine: Any, directory: str | Path, tag: str | None = None) -> Path:
    """Save model + optimizer (+ ZeRO shards) under ``directory`` (collective: every rank calls).

    Returns the directory. DeepSpeed writes ``<directory>/<tag>/`` and a ``latest`` file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=tag)
    return directory


def load_checkpoint(engine: Any, directory: str | Path, tag: str | None = None) -> Path:
    """Restore what ``save_checkpoint`` wrote (latest tag unless given); clear error if absent."""
    directory = Path(directory)
    load_path, _ = engine.load_checkpoint(str(directory), tag=tag)
    if load_path is None:
        raise FileNotFoundError(
            f"no DeepSpeed checkpoint in {directory} (tag={tag!r}); check the path or save one "
            "with save_checkpoint first"
        )
    return Path(load_path)


def full_state_dict(engine: Any) -> dict[str, Tensor]:
    """The full (unsharded) model state on every rank, as CPU copies (collective under ZeRO-3).

    ZeRO 1/2 shard only optimizer state and gradients, so the module holds full weights; ZeRO-3
    shards the weights too and they are gathered for the copy. Use it to write a plain checkpoint
    that the single-process code (inference, evaluation) can read.
    """
    deepspeed = _import_deepspeed()
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
