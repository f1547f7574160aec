"""Pipeline parallelism of a ``Reslim`` over its blocks (``torch.distributed.pipelining``).

The blocks are split into ``n_stages`` equal, consecutive groups, one stage per rank of the
pipeline group. The first stage also holds the tokenisation, aggregation and embeddings, and the
whole fine-grid branch that needs the raw inputs (bilinear skip + residual CNN), so only two
tensors travel between stages: the tokens ``z [B, L, D]`` and the fine-grid ``base`` (skip +
residual) ``[B, O, mag*h, mag*w]``. The last stage holds the final norm, the head and the head
convolution and returns ``base + head``; the loss is computed there. Micro-batches are scheduled
by GPipe or 1F1B (``make_schedule``); gradients are scaled by 1 / micro-batches (torch's
``scale_grads``), so a per-micro-batch mean loss gives the gradient of the full-batch mean.

Every stage module names its parameters as the whole model does (``blocks`` is a ``ModuleDict``
keyed by the block's index in the model), so the stages' state dicts are disjoint parts of the
model's: ``torch.distributed.checkpoint`` saves them side by side and the consolidated weights
are their union. A stage holds no reference to the rest of the model, which is freed.

In the training engine ``pp`` is the outermost dimension of the layout (``parallel/layout.py``):
``parallelize`` applies TP first, then splits the stages (``split_stage``), and the engine drives
them with ``Pipeline`` (a schedule for training, a plain send/receive chain for validation). The
data-parallel replicas of a stage average their gradients in ``reduce_gradients``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ..model.layers import unpatchify
from ..model.reslim import Reslim, embed_tokens, validate_inputs

__all__ = ["SCHEDULES", "Pipeline", "check_stages", "make_schedule", "pipeline_stage",
           "split_stage"]

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


def _blocks(model: Reslim, blocks: list[nn.Module]) -> nn.ModuleDict:
    """``blocks`` keyed by their index in ``model`` (the model's parameter names)."""
    index = {id(b): i for i, b in enumerate(model.blocks)}
    return nn.ModuleDict({str(index[id(b)]): b for b in blocks})


class FirstStage(nn.Module):
    """Tokens through the first blocks, plus the fine-grid skip + residual branch."""

    def __init__(self, model: Reslim, blocks: list[nn.Module], last: bool) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.tokenizer, self.aggregator = model.tokenizer, model.aggregator
        self.pos_scale, self.res_embed, self.pos_drop = (model.pos_scale, model.res_embed,
                                                         model.pos_drop)
        self.residual = model.residual
        self.out_index = model.out_index
        self.blocks = _blocks(model, blocks)
        self.last = LastStage(model, []) if last else None

    # the model's own fine-grid helpers (they read only cfg and out_index)
    coarse_outputs = Reslim.coarse_outputs
    upsample_skip = Reslim.upsample_skip

    def forward(self, x: Tensor, static: Tensor, res_km: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, base)`` for the next stage (or the prediction on a single stage)."""
        validate_inputs(self.cfg, x, static)
        static = static.to(x.dtype)
        p = self.cfg.patch_size
        z = embed_tokens(self, self.tokenizer(x, static), x.shape[-2] // p, x.shape[-1] // p,
                         res_km)
        for block in self.blocks.values():
            z = block(z)
        base = self.upsample_skip(x) + self.residual(self.coarse_outputs(x), static)
        return self.last(z, base) if self.last is not None else (z, base)


class MiddleStage(nn.Module):
    """Blocks only; ``base`` passes through."""

    def __init__(self, model: Reslim, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = _blocks(model, blocks)

    def forward(self, z: Tensor, base: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        for block in self.blocks.values():
            z = block(z)
        return z, base


class LastStage(nn.Module):
    """The last blocks, the final norm, the head and its convolution: the prediction."""

    def __init__(self, model: Reslim, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.blocks = _blocks(model, blocks)
        self.norm, self.head, self.head_conv = model.norm, model.head, model.head_conv

    def forward(self, z: Tensor, base: Tensor) -> Tensor:  # noqa: D102
        for block in self.blocks.values():
            z = block(z)
        p, mag, n_out = self.cfg.patch_size, self.cfg.mag, len(self.cfg.out_vars)
        h, w = base.shape[-2] // (mag * p), base.shape[-1] // (mag * p)
        y = self.head_conv(unpatchify(self.head(self.norm(z)), n_out, h, w, mag * p))
        return base + y


def split_stage(model: Reslim, stage: int, n_stages: int) -> nn.Module:
    """The module of pipeline stage ``stage`` of ``n_stages``: its share of the blocks (and the
    embedding on the first stage, the head on the last), named as in ``model``."""
    depth = len(model.blocks)
    check_stages(depth, n_stages)
    per = depth // n_stages
    blocks = list(model.blocks)[stage * per:(stage + 1) * per]
    if stage == 0:
        return FirstStage(model, blocks, last=n_stages == 1)
    if stage == n_stages - 1:
        return LastStage(model, blocks)
    return MiddleStage(model, blocks)


def pipeline_stage(model: Reslim, stage: int, n_stages: int, device: torch.device,
                   group: ProcessGroup | None = None) -> tuple[PipelineStage, nn.Module]:
    """This rank's ``PipelineStage`` of ``model`` (and its module, which owns its parameters)."""
    module = split_stage(model, stage, n_stages)
    return PipelineStage(module, stage, n_stages, device, group=group), module


def make_schedule(stage: PipelineStage, schedule: str, n_microbatches: int, loss_fn):
    """GPipe (all forwards, then all backwards) or 1F1B (interleaved, fewer live activations)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    return SCHEDULES[schedule](stage, n_microbatches, loss_fn=loss_fn)


_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class Pipeline:
    """This rank's stage in the training engine: ``forward_backward`` runs one batch through the
    schedule in micro-batches, ``predict`` one batch forward only (validation).

    Validation goes through a plain send/receive chain rather than the schedule: its batches
    may be smaller than a training batch (the last one of the shard), and a schedule's stages
    keep the shapes of the first batch they saw.
    """

    def __init__(self, module: nn.Module, stage: int, n_stages: int, device: torch.device,
                 group: ProcessGroup, schedule: str, microbatches: int) -> None:
        self.module, self.stage, self.n_stages = module, stage, n_stages
        self.device, self.group, self.microbatches = device, group, microbatches
        self.first, self.last = stage == 0, stage == n_stages - 1
        self._pipe = PipelineStage(module, stage, n_stages, device, group=group)
        self.schedule = make_schedule(self._pipe, schedule, microbatches, self._loss)
        self._loss_fn, self._n_out, self._mask_dtype = None, 0, None

    def _loss(self, pred: Tensor, target: Tensor) -> Tensor:
        # the schedule splits one target tensor per micro-batch: targets and mask side by side
        y, mask = target[:, :self._n_out], target[:, self._n_out:]
        return self._loss_fn(pred, y, mask.to(self._mask_dtype) if self._mask_dtype else None)

    def forward_backward(self, x: Tensor, static: Tensor, y: Tensor, mask: Tensor | None,
                         res_km: float, loss_fn) -> Tensor:
        """Forward and backward of this data-parallel rank's batch (gradients accumulate into
        the stage's parameters, scaled by 1 / micro-batches); the batch's mean loss (the mean
        of the micro-batch means) on every stage."""
        if x.shape[0] % self.microbatches:
            raise ValueError(
                f"parallel.microbatches={self.microbatches} does not divide this rank's batch of "
                f"{x.shape[0]} samples; choose a divisor of it")
        self._loss_fn, self._n_out = loss_fn, y.shape[1]
        self._mask_dtype = None if mask is None else mask.dtype
        target = y if mask is None else torch.cat([y, mask.to(y.dtype)], dim=1)
        res = torch.full((x.shape[0],), float(res_km), dtype=x.dtype, device=x.device)
        losses: list[Tensor] = []
        self.schedule.step(*((x, static, res) if self.first else ()),
                           target=target if self.last else None, losses=losses)
        dtype = torch.promote_types(y.dtype, torch.float32)  # what the loss function returns
        loss = (torch.stack([v.detach() for v in losses]).mean().to(dtype) if self.last
                else torch.zeros((), dtype=dtype, device=x.device))
        dist.broadcast(loss, group=self.group, group_src=self.n_stages - 1)
        return loss

    @torch.no_grad()
    def predict(self, x: Tensor, static: Tensor, res_km: float) -> Tensor | None:
        """The prediction on the last stage (None on the others); every stage must call it."""
        out = self.module(x, static, res_km) if self.first else self.module(*self._recv())
        if self.last:
            return out
        self._send(out)
        return None

    def _send(self, tensors: tuple[Tensor, ...]) -> None:
        for t in tensors:  # a header (dtype, rank, shape) lets the next stage allocate
            header = torch.zeros(8, dtype=torch.int64)
            header[:2] = torch.tensor([_DTYPES.index(t.dtype), t.ndim])
            header[2:2 + t.ndim] = torch.tensor(t.shape)
            dist.send(header.to(t.device), group=self.group, group_dst=self.stage + 1)
            dist.send(t.contiguous(), group=self.group, group_dst=self.stage + 1)

    def _recv(self) -> tuple[Tensor, Tensor]:
        out = []
        for _ in range(2):  # (z, base)
            header = torch.zeros(8, dtype=torch.int64, device=self.device)
            dist.recv(header, group=self.group, group_src=self.stage - 1)
            dtype, ndim, *shape = header.tolist()
            t = torch.empty(shape[:ndim], dtype=_DTYPES[dtype], device=self.device)
            dist.recv(t, group=self.group, group_src=self.stage - 1)
            out.append(t)
        return out[0], out[1]
