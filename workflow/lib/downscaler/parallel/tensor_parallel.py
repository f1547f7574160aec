"""Megatron tensor parallelism of the transformer blocks, applied from outside the model.

In each ``Block``: ``attn.qkv`` and ``mlp.fc1`` are split by output columns (each rank holds
whole heads, because ``qkv`` packs its features head by head) and ``attn.proj`` and ``mlp.fc2``
by input rows. Forward then needs one all-reduce after attention and one after the MLP; backward
the conjugate all-reduces of the input gradients. This is DTensor's ``ColwiseParallel`` /
``RowwiseParallel`` pair, which also adds the row-parallel bias once, after the all-reduce (the
pitfall in public code is adding it on every rank before the sum: an effective bias ``tp*b``).
Everything outside the blocks stays replicated on the tp ranks and computes identical values and
identical gradients there, so no extra gradient reduction over tp is needed.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from ..model.layers import Attention, Block, Mlp

__all__ = ["apply_tensor_parallel", "block_tp_plan"]


def block_tp_plan() -> dict[str, ColwiseParallel | RowwiseParallel]:
    """The per-``Block`` plan: column split of ``qkv``/``fc1``, row split of ``proj``/``fc2``.

    Inputs and outputs of the plan are plain (replicated) tensors, so the rest of the model and
    the Ulysses all-to-all see ordinary local tensors.
    """
    return {
        "attn.qkv": ColwiseParallel(),
        "attn.proj": RowwiseParallel(),
        "mlp.fc1": ColwiseParallel(),
        "mlp.fc2": RowwiseParallel(),
    }


def _check_block(name: str, block: Block, tp: int) -> None:
    """Raise a clear error unless ``block`` splits evenly into ``tp`` parts."""
    attn, mlp = block.attn, block.mlp
    if not isinstance(attn, Attention) or not isinstance(mlp, Mlp):
        raise TypeError(f"{name}: tensor parallel expects Block.attn: Attention, Block.mlp: Mlp")
    if isinstance(attn.qkv.weight, DTensor):
        raise ValueError(f"{name} is already tensor-parallel; apply_tensor_parallel only once")
    if attn.n_heads % tp:
        raise ValueError(
            f"{name}.attn has {attn.n_heads} heads, not divisible by tp={tp}; "
            "choose num_heads divisible by tp"
        )
    hidden = mlp.fc1.out_features
    if hidden % tp:
        raise ValueError(
            f"{name}.mlp hidden size {hidden} is not divisible by tp={tp}; change mlp_ratio or tp"
        )


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> int:
    """Shard every ``Block`` of ``model`` over the 1-D ``tp_mesh`` in place; return the count.

    Each attention module's ``n_heads`` becomes its local head count ``n_heads / tp``.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"tp_mesh must be 1-D (mesh['tp']), got {tp_mesh.ndim}-D")
    tp = tp_mesh.size()
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"no transformer Block found in {type(model).__name__} to shard")
    for name, block in blocks:
        _check_block(name, block, tp)
    for _, block in blocks:
        parallelize_module(block, tp_mesh, block_tp_plan())
        block.attn.n_heads //= tp  # read at forward: the qkv shard holds n_heads/tp whole heads
    return len(blocks)
