"""Compose every parallelism on a plain ``Reslim`` from one ``Layout`` (torchtitan's shape).

Order: D-CHAG -> tensor parallel -> sequence parallel (Ulysses or LSS) -> activation
checkpointing -> pipeline split -> FSDP2 / HSDP or DDP. Each step is a function that does one
thing to the model in place; the pipeline split keeps this rank's stage (its blocks already
tensor-parallel), and the data-parallel wrap comes last so it sees the final parameters. A
pipeline stage is not wrapped: its data-parallel replicas average every gradient in
``reduce_gradients`` (after the schedule's last backward), which is exact and keeps the
schedule's micro-batches free of DDP's per-backward hooks.

Training step contract for callers (the training engine)::

    x, static, y = shard_batch(x, static, y, layout, mesh)
    loss = loss_fn(model(x, static, res_km), y)      # mean over the local batch
    loss.backward()
    reduce_gradients(model, layout, mesh)            # ALWAYS (needed for sp > 1 and FSDP)
    optimizer.step()

``parallelize`` does not hide these reductions in hooks: FSDP2 reduces gradients inside
backward and assigns sharded gradients directly, so no parameter hook would see them.
``reduce_gradients`` is one explicit, cheap call after ``backward`` (before clipping and the
optimizer step): it sums block gradients over the sp group and averages the 0-d parameters
FSDP2 cannot shard (``pos_scale``) over the data-parallel ranks; it does nothing for layouts
that need nothing beyond DDP / tensor parallel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ..model.activation_checkpointing import apply_activation_checkpointing
from ..model.reslim import Reslim
from .data_parallel import apply_ddp, apply_fsdp, dp_unreduced_parameters, unwrap
from .layout import MESH_DIMS, Layout, LayoutError
from .sequence_parallel import apply_sequence_parallel, sequence_sharded_parameters
from .tensor_parallel import apply_tensor_parallel

__all__ = ["parallelize", "reduce_gradients", "shard_batch"]


def _check_mesh(layout: Layout, mesh: DeviceMesh) -> None:
    """The mesh must be ``build_mesh(layout)``: same dim names, same sizes."""
    names = tuple(mesh.mesh_dim_names or ())
    if names != MESH_DIMS:
        raise LayoutError(
            f"mesh dims are {names} but must be {MESH_DIMS}; build it with build_mesh(layout)"
        )
    sizes = tuple(mesh.size(i) for i in range(mesh.ndim))
    want = tuple(getattr(layout, n) for n in MESH_DIMS)
    if sizes != want:
        raise LayoutError(
            f"mesh sizes {dict(zip(MESH_DIMS, sizes, strict=True))} do not match the layout "
            f"{dict(zip(MESH_DIMS, want, strict=True))}; build the mesh with build_mesh(layout)"
        )


def parallelize(
    model: Reslim,
    layout: Layout,
    mesh: DeviceMesh | None,
    activation_checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Apply ``layout`` to ``model`` (modified in place) and return the module to train.

    The returned module is ``model`` itself, or a DDP wrapper around it when only
    ``dp_replicate > 1`` and the parameters are plain tensors (use ``data_parallel.unwrap``
    to reach ``cfg`` / ``state_dict`` names without the ``module.`` prefix). Every rank must
    build ``model`` identically (same seed) before calling this. ``param_dtype`` (e.g. bf16)
    is FSDP2's mixed-precision policy: parameters all-gathered and computed in it, gradients
    reduce-scattered in float32 (halves the communication of bf16 training). One process
    (``mesh`` None, an all-ones layout) gets activation checkpointing only, so every run goes
    through this one function.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "cfg"):
        raise TypeError(f"model must be a Reslim (with .cfg), got {type(model).__name__}")
    layout.validate(1 if mesh is None else mesh.size(), model.cfg)
    if mesh is None:
        if activation_checkpointing:
            apply_activation_checkpointing(model)
        return model
    _check_mesh(layout, mesh)
    if layout.dchag is not None:
        # Lazy: D-CHAG is optional and lives in its own module.
        from .dchag import apply_dchag

        apply_dchag(model, mesh["tp"], layout.dchag)
    if layout.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if layout.sp > 1:
        apply_sequence_parallel(model, mesh["sp"], layout.sp_mode)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if layout.pp > 1:
        # Lazy: torch.distributed.pipelining is only needed by pipelined layouts.
        from .pipeline import split_stage

        return split_stage(model, mesh["pp"].get_local_rank(), layout.pp)
    has_dtensor = any(isinstance(p, DTensor) for p in model.parameters())
    if layout.dp_shard > 1 or (layout.dp_replicate > 1 and has_dtensor):
        # HSDP when replicas exist; with dp_shard == 1 that is pure replication (DDP-equivalent)
        # for DTensor parameters, which torch's DDP cannot wrap.
        dp_mesh = mesh["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else mesh["dp_shard"]
        return apply_fsdp(model, dp_mesh, param_dtype=param_dtype)
    if layout.dp_replicate > 1:
        return apply_ddp(model, mesh["dp_replicate"])
    return model


def _local(t: Tensor) -> Tensor:
    """The local shard of a (possibly DTensor) tensor, sharing its storage."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _all_reduce_sum(tensors: list[Tensor], group: dist.ProcessGroup) -> None:
    """Sum ``tensors`` in place over ``group`` with one collective per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group_tensors in by_dtype.values():
        flat = _flatten_dense_tensors(group_tensors)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for t, reduced in zip(
            group_tensors, _unflatten_dense_tensors(flat, group_tensors), strict=True
        ):
            t.copy_(reduced)


@torch.no_grad()
def reduce_gradients(model: nn.Module, layout: Layout, mesh: DeviceMesh) -> None:
    """Finish the gradient reductions DDP / FSDP2 do not do; call after every ``backward``.

    - ``sp > 1``: block parameters saw only this rank's tokens, so their gradients are summed
      over the sp group (all other parameters already hold identical, complete gradients).
    - ``dp > 1``: gradients the data-parallel wrapper leaves alone are averaged over the
      data-parallel ranks: FSDP2's 0-d parameters (``pos_scale``: FSDP2 cannot shard scalars),
      or every gradient of a model that neither DDP nor FSDP2 wraps (a pipeline stage,
      parallelized by hand or by another engine).
    Tensor parallelism needs nothing here (DTensor reduces inside backward). With gradient
    accumulation call it once per optimizer step, after the last micro-batch's backward (the
    sums are linear; calling it per micro-batch would reduce earlier micro-batches twice).
    """
    _check_mesh(layout, mesh)
    inner = unwrap(model)
    if layout.sp > 1:
        grads = [_local(p.grad) for p in sequence_sharded_parameters(inner) if p.grad is not None]
        _all_reduce_sum(grads, mesh["sp"].get_group())
    unreduced = dp_unreduced_parameters(model) if layout.dp > 1 else []
    grads = [_local(p.grad) for p in unreduced if p.grad is not None]
    if grads:
        # Summing over both dp dims sums over every data-parallel rank of this (sp, tp) slot.
        for dim in ("dp_replicate", "dp_shard"):
            if getattr(layout, dim) > 1:
                _all_reduce_sum(grads, mesh[dim].get_group())
        for g in grads:
            g.div_(layout.dp)


def shard_batch(
    x: Tensor,
    static: Tensor | None,
    y: Tensor | None,
    layout: Layout,
    mesh: DeviceMesh,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """This rank's share of a global batch: the contiguous slice of the data-parallel rank.

    The data-parallel rank is ``dp_replicate_rank * dp_shard + dp_shard_rank``; all tp and sp
    ranks of one data-parallel rank get the same samples. The batch size must divide by
    ``dp = dp_replicate * dp_shard`` (equal local batches keep the mean-of-means exact).
    ``static`` / ``y`` may be ``None`` (e.g. at inference).
    """
    _check_mesh(layout, mesh)
    batch = x.shape[0]
    if batch % layout.dp:
        raise ValueError(
            f"global batch size {batch} is not divisible by the data-parallel degree "
            f"dp_replicate*dp_shard = {layout.dp}; choose a batch size that is a multiple of it"
        )
    for name, t in (("static", static), ("y", y)):
        if t is not None and t.shape[0] != batch:
            raise ValueError(f"{name} has batch size {t.shape[0]} but x has {batch}")
    rank = layout.dp_rank(mesh)
    local = batch // layout.dp
    sl = slice(rank * local, (rank + 1) * local)
    return x[sl], None if static is None else static[sl], None if y is None else y[sl]
