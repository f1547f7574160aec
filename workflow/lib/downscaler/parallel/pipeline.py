"""Pipeline parallelism of a ``Reslim`` over its blocks (``torch.distributed.pipelining``).

The blocks are split into ``n_stages`` equal, consecutive groups, one stage per rank of the
pipeline group. The first stage also holds the tokenisation, aggregation and embeddings, and the
whole fine-grid branch that needs the raw inputs (bilinear skip + residual CNN), so only two
tensors travel between stages: the tokens ``z [B, L, D]`` and the fine-grid ``base`` (skip +
residual) ``[B, O, mag*h, mag*w]``. The last stage holds the final norm, the head and the head
convolution and returns ``base + head``; the loss is computed there. Micro-batches are scheduled
by GPipe or 1F1B (``make_schedule``); gradients are scaled by 1 / micro-batches (torch's
``scale_grads``), so a per-micro-batch mean loss gives the gradient of the full-batch mean.

pp x dp: build a 2-D mesh ``("dp", "pp")``, give ``pipeline_stage`` the ``pp`` group, feed each
data-parallel rank its slice of the batch and call ``average_over_data_parallel`` after the
schedule's step. This module is standalone otherwise: it is not (yet) a ``Layout`` dimension and
does not compose with TP / SP / FSDP or the training engine (see README).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ..model.layers import unpatchify
from ..model.reslim import Reslim, embed_tokens, validate_inputs

__all__ = ["SCHEDULES", "average_over_data_parallel", "check_stages", "make_schedule",
           "pipeline_stage"]

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def check_stages(depth: int, n_stages: int) -> None:
    """Raise a ``ValueError`` naming the numbers and the nearest valid stage count unless the
    ``depth`` blocks split evenly into ``n_stages`` stages."""
    if n_stages < 1 or depth % n_stages:
        valid = [s for s in range(1, depth + 1) if depth % s == 0]
        near = min(valid, key=lambda s: (abs(s - n_stages), s))
        raise ValueError(
            f"pipeline: depth={depth} transformer blocks cannot be split into {n_stages} equal "
            f"stages; the nearest valid stage count is {near} (valid: {valid})")


class FirstStage(nn.Module):
    """Tokens through the first blocks, plus the fine-grid skip + residual branch."""

    def __init__(self, model: Reslim, blocks: list[nn.Module], last: bool) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.tokenizer, self.aggregator = model.tokenizer, model.aggregator
        self.pos_scale, self.res_embed, self.pos_drop = (model.pos_scale, model.res_embed,
                                                         model.pos_drop)
        self.residual = model.residual
        self.blocks = nn.ModuleList(blocks)
        self._model = [model]  # not a submodule: only for the helpers below
        self.last = LastStage(model, []) if last else None

    def forward(self, x: Tensor, static: Tensor, res_km: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, base)`` for the next stage (or the prediction on a single stage)."""
        model = self._model[0]
        validate_inputs(self.cfg, x, static)
        static = static.to(x.dtype)
        p = self.cfg.patch_size
        z = embed_tokens(self, self.tokenizer(x, static), x.shape[-2] // p, x.shape[-1] // p,
                         res_km)
        for block in self.blocks:
            z = block(z)
        base = model.upsample_skip(x) + self.residual(model.coarse_outputs(x), static)
        return self.last(z, base) if self.last is not None else (z, base)


class MiddleStage(nn.Module):
    """Blocks only; ``base`` passes through."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, z: Tensor, base: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        for block in self.blocks:
            z = block(z)
        return z, base


class LastStage(nn.Module):
    """The last blocks, the final norm, the head and its convolution: the prediction."""

    def __init__(self, model: Reslim, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.blocks = nn.ModuleList(blocks)
        self.norm, self.head, self.head_conv = model.norm, model.head, model.head_conv

    def forward(self, z: Tensor, base: Tensor) -> Tensor:  # noqa: D102
        for block in self.blocks:
            z = block(z)
        p, mag, n_out = self.cfg.patch_size, self.cfg.mag, len(self.cfg.out_vars)
        h, w = base.shape[-2] // (mag * p), base.shape[-1] // (mag * p)
        y = self.head_conv(unpatchify(self.head(self.norm(z)), n_out, h, w, mag * p))
        return base + y


def pipeline_stage(model: Reslim, stage: int, n_stages: int, device: torch.device,
                   group: ProcessGroup | None = None) -> tuple[PipelineStage, nn.Module]:
    """This rank's ``PipelineStage`` of ``model`` (and its module, which owns its parameters)."""
    depth = len(model.blocks)
    check_stages(depth, n_stages)
    per = depth // n_stages
    blocks = list(model.blocks)[stage * per:(stage + 1) * per]
    if stage == 0:
        module: nn.Module = FirstStage(model, blocks, last=n_stages == 1)
    elif stage == n_stages - 1:
        module = LastStage(model, blocks)
    else:
        module = MiddleStage(blocks)
    return PipelineStage(module, stage, n_stages, device, group=group), module


@torch.no_grad()
def average_over_data_parallel(module: nn.Module, dp_group: ProcessGroup) -> None:
    """Average this stage's gradients over the data-parallel replicas of the stage (pp x dp)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    world = dist.get_world_size(dp_group)
    for g in grads:  # a few tensors per stage; one collective each keeps this simple
        dist.all_reduce(g, group=dp_group)
        g.div_(world)


def make_schedule(stage: PipelineStage, schedule: str, n_microbatches: int, loss_fn):
    """GPipe (all forwards, then all backwards) or 1F1B (interleaved, fewer live activations)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    return SCHEDULES[schedule](stage, n_microbatches, loss_fn=loss_fn)
