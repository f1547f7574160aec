"""Data parallelism applied from outside: DDP, FSDP2 (``fully_shard``) and HSDP.

Convention: each data-parallel rank's loss is the mean over its local batch (equal local batch
sizes); DDP and FSDP2 average gradients over the data-parallel ranks, which then equals the
gradient of the full-batch mean.

- DDP (``torch.nn.parallel.DistributedDataParallel``) over ``mesh["dp_replicate"]``: parameters
  replicated, one gradient all-reduce. Only for plain (non-DTensor) parameters: torch's DDP does
  not compose with tensor-parallel DTensors (torchtitan rejects DDP + TP too), so
  ``parallelize`` replicates those models with FSDP2's HSDP on a shard dim of size 1.
- FSDP2 over ``mesh["dp_shard"]`` (1-D: parameters sharded) or HSDP over
  ``mesh["dp_replicate", "dp_shard"]`` (2-D: sharded within a group, replicated across groups).
  Each transformer ``Block`` is its own group (all-gathered just before it runs, freed after),
  then the root takes the remaining parameters. Tensor-parallel DTensor parameters on
  ``mesh["tp"]`` of the same root mesh become 2-D (FSDP x TP) DTensors.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..model.layers import Block

__all__ = [
    "apply_ddp",
    "apply_fsdp",
    "dp_unreduced_parameters",
    "unwrap",
]


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """``fully_shard`` every ``Block`` and then ``model`` itself over ``dp_mesh``, in place.

    ``dp_mesh`` 1-D gives FSDP, 2-D ``(replicate, shard)`` gives HSDP. ``reshard_after_forward``
    frees each block's gathered parameters after its forward (re-gathered in backward): less
    memory for one more all-gather. ``param_dtype`` (bf16 training) sets FSDP2's
    ``MixedPrecisionPolicy``: all-gather and compute in it, reduce gradients in float32.
    Returns ``model`` (now also an ``FSDPModule``).
    """
    if dp_mesh.ndim not in (1, 2):
        raise ValueError(
            f"dp_mesh must be 1-D (FSDP) or 2-D (HSDP: replicate, shard), got {dp_mesh.ndim}-D"
        )
    if isinstance(model, FSDPModule):
        raise ValueError("model is already FSDP-sharded; apply FSDP once")
    # FSDP2 cannot shard 0-d parameters (Reslim.pos_scale); they stay plain and replicated, and
    # reduce_gradients averages their gradients over the data-parallel ranks.
    scalars = {p for p in model.parameters() if p.ndim == 0}
    policy = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
              if param_dtype is not None else MixedPrecisionPolicy())
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        fully_shard(
            block,
            mesh=dp_mesh,
            reshard_after_forward=reshard_after_forward,
            mp_policy=policy,
            ignored_params={p for p in block.parameters() if p in scalars},
        )
    # The root is needed first in backward, so keeping it gathered saves an all-gather.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=policy,
                ignored_params=scalars)
    model._fsdp_unreduced_params = list(scalars)
    return model


def dp_unreduced_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters whose gradients the data-parallel wrapper leaves unreduced.

    All of them when nothing wraps the model; FSDP2's ignored (0-d) parameters under FSDP2;
    none under DDP.
    """
    if isinstance(model, DistributedDataParallel):
        return []
    if isinstance(model, FSDPModule):
        return list(getattr(model, "_fsdp_unreduced_params", []))
    return list(model.parameters())


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> DistributedDataParallel:
    """Wrap ``model`` in DDP over the 1-D ``dp_mesh``; parameter names gain a ``module.`` prefix.

    Parameters are broadcast from the group's first rank at construction, so all replicas start
    identical even if they were initialised differently.
    """
    if dp_mesh.ndim != 1:
        raise ValueError(f"DDP needs a 1-D mesh (mesh['dp_replicate']), got {dp_mesh.ndim}-D")
    dtensors = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    if dtensors:
        raise ValueError(
            f"DDP cannot wrap DTensor (tensor-parallel) parameters such as {dtensors[0]!r}; "
            "use FSDP2 (apply_fsdp on a 2-D (dp_replicate, dp_shard) mesh) instead"
        )
    # Pass the process group, not the mesh: DDP's mesh path would rewrite TP parameters.
    return DistributedDataParallel(model, process_group=dp_mesh.get_group())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so it needs no unwrapping)."""
    return model.module if isinstance(model, DistributedDataParallel) else model

