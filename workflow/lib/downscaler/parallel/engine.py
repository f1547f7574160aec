"""The training engine: the model as trained, its optimizer, one step, and its saved state.

One interface, two implementations (torchtitan's split between the model transforms and the
loop): ``TorchEngine`` (one process, or DDP / FSDP2 / HSDP / TP / SP / D-CHAG / pipeline through
``parallelize``) and ``DeepSpeedEngine`` (ZeRO 0-3). The loop in ``downscaler.train`` only calls

- ``build_engine(model, train, parallel, device, world, tokens)``
- ``engine.step(loss)``: backward, gradient reductions, clipping, optimizer step;
- under a pipeline layout (``engine.pipeline`` not None) the loop calls
  ``engine.forward_backward(...)`` instead of the model and the loss (the schedule runs forward
  and backward together), ``engine.step(loss)`` then skips the backward, and validation calls
  ``engine.pipeline.predict`` (the prediction on the last stage only);
- ``engine.save(state_dir, meta, rank_state)`` / ``engine.load(path)``: the resumable state;
- ``engine.full_state()``: the consolidated single-process weights (collective);
- ``engine.scheduler(factor)``: the learning-rate schedule over the engine's optimizer;
- ``model``, ``dp_rank``, ``dp_size``, ``kind``, ``autocast_dtype``, ``dchag``.

D-CHAG is a model transform applied in ``parallelize``; the engine only needs to know which
parameters hold different values per tp rank, for the gradient norm.

With ``parallel.layout: auto`` the torch engine asks the layout planner for the layout at
start-up (``planned_layout``) and logs the choice and the planner's reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..train_config import ParallelConfig, TrainConfig
from . import train_state
from .clip import clip_grad_norm_
from .dchag import is_tp_distinct
from .layout import (
    Layout,
    LayoutError,
    build_mesh,
    check_microbatches,
    microbatches,
    resolve_sizes,
)
from .parallelize import parallelize, reduce_gradients
from .planner import GIB, ModelSize, Plan, device_memory_bytes, plan_layout

__all__ = ["DeepSpeedEngine", "TorchEngine", "build_engine", "autocast_dtype", "planned_layout"]

log = logging.getLogger("downscaler.train.engine")  # into the run's per-rank log


def autocast_dtype(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where asked (or 'auto' on a GPU that supports it), else None."""
    if requested == "bf16":
        return torch.bfloat16
    if requested == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def planned_layout(base: nn.Module, par: ParallelConfig, device: torch.device, world: int,
                   tokens: int, global_batch: int, act_dtype: torch.dtype | None) -> Plan:
    """The planner's layout for this run (``parallel.layout: auto``): from the world size, the
    model, ``tokens`` per sample, the global batch and the memory per rank (``memory_gib``, or
    the device's). Every rank computes it from the same numbers; the memory is the smallest of
    all ranks', so they agree."""
    memory = par.memory_gib * GIB
    if memory <= 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        memory = device_memory_bytes(device, local)
    if dist.is_initialized() and world > 1:
        smallest = torch.tensor([float(memory)], dtype=torch.float64,
                                device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        memory = smallest.item()
    param_bytes = next(base.parameters()).element_size()
    act_bytes = torch.tensor([], dtype=act_dtype).element_size() if act_dtype else param_bytes
    return plan_layout(ModelSize.from_model(base), tokens, world, memory, act_bytes=act_bytes,
                       state_bytes=param_bytes, global_batch=global_batch,
                       pp_schedule=par.pp_schedule)


class TorchEngine:
    """Plain torch AdamW on the model parallelized by ``downscaler.parallel.parallelize``."""

    kind = "torch"

    def __init__(self, base: nn.Module, train: TrainConfig, par: ParallelConfig,
                 device: torch.device, world: int, tokens: int | None = None) -> None:
        self.grad_clip = train.grad_clip
        self.autocast_dtype = autocast_dtype(train.precision, device)
        checkpointing = par.activation_checkpointing
        self.plan: Plan | None = None
        if par.layout == "auto":
            if tokens is None:
                raise ValueError("parallel.layout: auto needs the tokens per sample to plan; "
                                 "pass tokens= to build_engine")
            self.plan = planned_layout(base, par, device, world, tokens, train.batch_size,
                                       self.autocast_dtype)
            self.layout, checkpointing = self.plan.layout, self.plan.activation_checkpointing
            log.info("parallel.layout auto: %s", self.plan.as_config())
            log.info("planner's reason: %s", self.plan.reason)
        else:
            self.layout = Layout.from_config(resolve_sizes(par.sizes(), world))
        self.activation_checkpointing = checkpointing
        self.layout.validate(world, base.cfg)
        base.to(device)
        self.mesh = None
        self.model: nn.Module = base
        self.tp_group = None
        self.dp_rank, self.dp_size = 0, 1
        if world > 1:
            self.mesh = build_mesh(self.layout, device.type)
            self.dp_size = self.layout.dp
            self.dp_rank = self.layout.dp_rank(self.mesh)
            if self.layout.dchag is not None:
                self.tp_group = self.mesh["tp"].get_group()
        self.model = parallelize(base, self.layout, self.mesh,
                                 activation_checkpointing=checkpointing,
                                 param_dtype=self.autocast_dtype)
        self.pipeline, self.pp_group = None, None
        if self.layout.pp > 1:
            self._build_pipeline(train, par, device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train.lr,
                                           betas=train.betas, weight_decay=train.weight_decay)
        self.dchag = train_state.dchag_metadata(self.model)

    def _build_pipeline(self, train: TrainConfig, par: ParallelConfig,
                        device: torch.device) -> None:
        """This rank's stage driven by the configured schedule (``par.pp_schedule``)."""
        from .pipeline import Pipeline

        local = train.batch_size // self.layout.dp
        n_micro = microbatches(par, self.layout.pp, local)
        problems = check_microbatches(n_micro, local, self.layout.pp, par.pp_schedule)
        if problems:  # checked with the config too; srun's task count may change dp
            raise LayoutError(problems[0])
        self.pp_group = self.mesh["pp"].get_group()
        self.pipeline = Pipeline(self.model, self.mesh["pp"].get_local_rank(), self.layout.pp,
                                 device, self.pp_group, par.pp_schedule, n_micro)

    def forward_backward(self, x: torch.Tensor, static: torch.Tensor, y: torch.Tensor,
                         mask: torch.Tensor | None, res_km: float, loss_fn) -> torch.Tensor:
        """Pipeline layouts: forward and backward of this rank's batch through the schedule;
        the batch's loss on every stage (``step`` then finishes the step)."""
        self.optimizer.zero_grad(set_to_none=True)
        return self.pipeline.forward_backward(x, static, y, mask, res_km, loss_fn)

    def step(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Backward (unless the pipeline schedule ran it), the reductions DDP/FSDP2 leave,
        clipping, the optimizer step; returns the gradient norm when clipping is on."""
        if self.pipeline is None:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if self.mesh is not None:
            reduce_gradients(self.model, self.layout, self.mesh)
        norm = None
        if self.grad_clip > 0:
            norm = clip_grad_norm_(self.model, self.grad_clip, self.tp_group,
                                   is_tp_distinct if self.tp_group is not None else None,
                                   pp_group=self.pp_group)
        self.optimizer.step()
        return norm

    def scheduler(self, factor: Callable[[int], float]) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def save(self, state_dir: Path, meta: dict, rank_state: dict) -> Path:
        return train_state.save_train_state(state_dir, self.model, self.optimizer, meta,
                                            rank_state, flatten_optim=self.pipeline is not None)

    def load(self, path: Path) -> tuple[dict, dict | None]:
        return train_state.load_train_state(path, self.model, self.optimizer,
                                            flatten_optim=self.pipeline is not None)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Consolidated single-process weights on rank 0 (empty elsewhere); collective."""
        if self.pipeline is not None:
            leader = all(self.mesh[d].get_local_rank() == 0
                         for d in ("dp_replicate", "dp_shard", "sp", "tp"))
            return train_state.full_pipeline_state(self.model, self.pp_group, leader)
        return train_state.full_model_state(self.model)


class DeepSpeedEngine:
    """DeepSpeed ZeRO (stage ``parallel.zero_stage``) over plain data parallelism; it clips
    (``gradient_clipping``) and casts (its bf16 section) itself."""

    kind = "deepspeed"
    pipeline = None  # ZeRO over plain data parallelism

    def __init__(self, base: nn.Module, train: TrainConfig, par: ParallelConfig,
                 device: torch.device, world: int) -> None:
        # the layout (plain data parallelism only) was checked with the config
        # (parallel.layout.check_parallel_config)
        try:
            from .deepspeed_engine import build_deepspeed_engine
        except ImportError as err:
            raise ImportError(
                f"config key parallel.engine is 'deepspeed' but it cannot be loaded ({err}); "
                "pip install deepspeed, or set parallel.engine: torch") from err
        bf16 = autocast_dtype(train.precision, device) is not None
        section = {"zero_stage": par.zero_stage, "lr": train.lr,
                   "weight_decay": train.weight_decay, "betas": list(train.betas),
                   "grad_clip": train.grad_clip, "bf16": bf16,
                   "micro_batch_size": train.batch_size // world}
        self.autocast_dtype = None  # DeepSpeed casts the model itself
        self.base_lr = train.lr
        self.ds_engine = build_deepspeed_engine(base, section)
        self.model = self.ds_engine
        self.optimizer = self.ds_engine.optimizer
        self.dp_rank, self.dp_size = dist.get_rank(), world
        self.dchag = None

    def step(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Backward and step (DeepSpeed clips inside); returns its gradient norm if it has one."""
        self.ds_engine.backward(loss)
        self.ds_engine.step()
        norm = self.ds_engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(float(norm))

    def scheduler(self, factor: Callable[[int], float]) -> Any:
        return _ManualLR(self.optimizer, self.base_lr, factor)

    def save(self, state_dir: Path, meta: dict, rank_state: dict) -> Path:
        from .deepspeed_engine import save_checkpoint

        return train_state.save_train_state(
            state_dir, self.model, self.optimizer, meta, rank_state,
            engine_save=lambda path: save_checkpoint(self.ds_engine, str(path)))

    def load(self, path: Path) -> tuple[dict, dict | None]:
        from .deepspeed_engine import load_checkpoint

        return train_state.load_train_state(
            path, self.model, self.optimizer,
            engine_load=lambda p: load_checkpoint(self.ds_engine, str(p)))

    def full_state(self) -> dict[str, torch.Tensor]:
        """Full weights on rank 0 (ZeRO-3 parameters gathered first); collective."""
        from .deepspeed_engine import full_state_dict

        state = full_state_dict(self.ds_engine)
        return state if dist.get_rank() == 0 else {}


class _ManualLR:
    """Warm-up + cosine set on the param groups directly (DeepSpeed's optimizer wrappers are not
    torch Optimizers, so LambdaLR cannot drive them); same interface as LambdaLR here."""

    def __init__(self, optimizer: Any, base_lr: float, factor: Callable[[int], float]) -> None:
        self.optimizer, self.base_lr, self.factor, self.last_epoch = optimizer, base_lr, factor, 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * self.factor(self.last_epoch)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [self.base_lr * self.factor(self.last_epoch)]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = state["last_epoch"]
        self._apply()


def build_engine(base: nn.Module, train: TrainConfig, par: ParallelConfig,
                 device: torch.device, world: int,
                 tokens: int | None = None) -> TorchEngine | DeepSpeedEngine:
    """The engine ``parallel.engine`` names, around the freshly built (identical on every rank)
    model ``base``; ``tokens`` (transformer tokens per sample) is what ``parallel.layout: auto``
    plans for."""
    if par.dchag and world == 1:
        raise ValueError(
            f"config key parallel.dchag={par.dchag!r} splits the channels over the "
            "tensor-parallel group and needs parallel.tp >= 2 processes; set parallel.tp "
            "and parallel.processes (or the srun task count), or set parallel.dchag: null")
    engines = {"torch": TorchEngine, "deepspeed": DeepSpeedEngine}
    if par.engine not in engines:
        raise ValueError(f"config key parallel.engine: {par.engine!r} is not 'torch' or "
                         "'deepspeed'")
    if par.engine == "torch":
        return TorchEngine(base, train, par, device, world, tokens)
    return engines[par.engine](base, train, par, device, world)
