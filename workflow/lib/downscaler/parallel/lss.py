"""Long-Sequence-Segmentation (LSS, arXiv 2311.02382) attention for sequence parallelism.

Each rank of the sp group holds one contiguous segment of ``L/sp`` tokens (the same scatter and
gather around the blocks as Ulysses, ``sequence_parallel.apply_sequence_parallel``). Inside
attention the queries stay local; keys and values are all-gathered over the group, so every rank
attends its ``L/sp`` queries over all ``L`` keys with ALL heads (Ulysses instead splits heads,
so LSS needs no ``num_heads % sp``, at the price of holding the full K and V).

The gather's backward is a reduce-scatter: every rank's queries put gradient on every key and
value, so the gradient of this rank's K/V segment is the SUM over ranks of the gradient each
computed for that segment. (A slice backward would drop the other ranks' terms.) Block
parameters then hold per-segment partial gradients, summed over sp by
``parallelize.reduce_gradients`` exactly as under Ulysses.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from ..model.layers import Attention

__all__ = ["LssAttention", "gather_segments"]

# One-tensor collectives along dim 0 (NCCL-friendly); renamed in torch 2.13.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_dim(x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order (one collective)."""
    world = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x, group=group)
    return torch.cat(out.chunk(world, dim=0), dim=dim)


def _reduce_scatter_dim(x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    """Sum ``x`` over the group and keep this rank's chunk along ``dim`` (one collective)."""
    world = dist.get_world_size(group)
    send = torch.cat(x.chunk(world, dim=dim), dim=0).contiguous()  # chunk j -> rank j
    out = send.new_empty((send.shape[0] // world, *send.shape[1:]))
    _reduce_scatter_single(out, send, op=dist.ReduceOp.SUM, group=group)
    return out


class _GatherSegments(torch.autograd.Function):
    """All-gather along ``dim`` forward; reduce-scatter along ``dim`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, dim: int) -> Tensor:  # noqa: D102
        ctx.group, ctx.dim = group, dim
        return _all_gather_dim(x, group, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return _reduce_scatter_dim(grad, ctx.group, ctx.dim), None, None


def gather_segments(x: Tensor, group: ProcessGroup, dim: int = 1) -> Tensor:
    """The full sequence from every rank's segment, with the exact (reduce-scatter) backward."""
    return _GatherSegments.apply(x, group, dim)


class LssAttention(Attention):
    """``Attention`` on a segment: local queries over all-gathered keys and values.

    Installed by swapping an ``Attention`` instance's class (parameter names and any tensor
    parallel plan on ``qkv`` / ``proj`` are kept); ``sp_group`` is set on the instance.
    """

    sp_group: ProcessGroup

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, L/sp, D] -> [B, L/sp, D]`` with attention over all ``L`` tokens."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, self.n_heads, 3, -1)
        q = qkv[:, :, :, 0].transpose(1, 2)  # [B, H, L/sp, hd]
        # One gather for K and V together: [B, L/sp, H, 2, hd] -> [B, L, H, 2, hd].
        kv = gather_segments(qkv[:, :, :, 1:], self.sp_group, dim=1)
        k, v = kv.permute(3, 0, 2, 1, 4).unbind(0)  # 2 x [B, H, L, hd]
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, -1)))
