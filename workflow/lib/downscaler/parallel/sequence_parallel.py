"""Sequence parallelism of the transformer blocks, from outside: Ulysses (DeepSpeed-Ulysses),
here, or LSS (``lss.LssAttention``), which shares the scatter / gather below.

The ``L`` tokens that enter the first ``Block`` are split into ``sp`` contiguous chunks, one per
rank of the sp group; every block then runs on ``L/sp`` tokens. Attention needs all tokens, so
inside it one all-to-all on the packed q, k, v scatters heads and gathers the sequence (each rank
then attends over the full sequence with ``H/sp`` heads) and one all-to-all goes back. After the
last block the chunks are all-gathered, so the final norm, the head and the residual path run
replicated, exactly as before the blocks (tokenizer, aggregation, embeddings).

Gradients, with each sp rank holding the same (replicated) loss:

- the gather after the blocks has a *slice* backward: the incoming gradient is already the full
  and identical one on every rank, so each rank keeps its own chunk (a reduce-scatter would count
  it ``sp`` times);
- the scatter before the blocks has an *all-gather* backward: each rank's chunk gradient is
  complete (the all-to-alls carry the cross-token terms), so gathering them gives every rank the
  full gradient of the pre-block activations;
- hence every parameter outside the blocks gets identical, complete gradients on all sp ranks,
  while each block parameter only sees its rank's ``L/sp`` tokens: those gradients must be
  *summed* over the sp group (``sequence_sharded_parameters``; done by
  ``parallelize.reduce_gradients``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from ..model.layers import Attention
from .lss import LssAttention

__all__ = [
    "SP_MODES",
    "UlyssesAttention",
    "apply_sequence_parallel",
    "gather_sequence",
    "scatter_sequence",
    "seq_all_to_all",
    "sequence_sharded_parameters",
]


def _all_to_all(x: Tensor, group: ProcessGroup, scatter_dim: int, gather_dim: int) -> Tensor:
    """Split ``x`` along ``scatter_dim`` into group-size chunks, send chunk ``j`` to rank ``j``,
    and concatenate what arrives along ``gather_dim`` (in rank order)."""
    world = dist.get_world_size(group)
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()  # [world, ...chunk]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _SeqAllToAll(torch.autograd.Function):
    """All-to-all whose backward is the inverse all-to-all (swap the scatter and gather dims)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, scatter_dim: int, gather_dim: int) -> Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def seq_all_to_all(x: Tensor, group: ProcessGroup, scatter_dim: int, gather_dim: int) -> Tensor:
    """Differentiable all-to-all over ``group`` (``x.shape[scatter_dim]`` divisible by its size)."""
    world = dist.get_world_size(group)
    if x.shape[scatter_dim] % world:
        raise ValueError(
            f"all-to-all over {world} ranks needs dim {scatter_dim} of shape {tuple(x.shape)} "
            f"divisible by {world}"
        )
    return _SeqAllToAll.apply(x, group, scatter_dim, gather_dim)


class _ScatterSequence(torch.autograd.Function):
    """Replicated ``[B, L, D]`` -> this rank's ``[B, L/sp, D]``; backward all-gathers."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        return x.chunk(world, dim=dim)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherSequence(torch.autograd.Function):
    """This rank's ``[B, L/sp, D]`` -> replicated ``[B, L, D]``; backward keeps own chunk."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(world, dim=ctx.dim)[rank].contiguous(), None, None


def _all_gather(x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def scatter_sequence(x: Tensor, group: ProcessGroup, dim: int = 1) -> Tensor:
    """This rank's contiguous chunk of the (replicated) token sequence; clear error if uneven."""
    world = dist.get_world_size(group)
    if x.shape[dim] % world:
        raise ValueError(uneven_sequence_message(x.shape[dim], world))
    return _ScatterSequence.apply(x, group, dim)


def uneven_sequence_message(tokens: int, sp: int) -> str:
    """Why ``tokens`` cannot be split over ``sp`` ranks, with the nearest valid choices."""
    lower, upper = tokens // sp * sp, (tokens // sp + 1) * sp
    near_tokens = f"{lower} or {upper}" if lower else f"{upper}"
    divisors = [d for d in range(1, tokens + 1) if tokens % d == 0]
    best = min(abs(d - sp) for d in divisors)
    near_sp = " or ".join(str(d) for d in divisors if abs(d - sp) == best)
    return (f"sequence parallel: {tokens} tokens cannot be split over sp={sp} ranks; use a tile "
            f"whose token count (h/patch)*(w/patch) is a multiple of {sp} (nearest: "
            f"{near_tokens} tokens) or an sp that divides {tokens} (nearest: sp={near_sp})")


def gather_sequence(x: Tensor, group: ProcessGroup, dim: int = 1) -> Tensor:
    """The full token sequence from every rank's chunk (inverse of ``scatter_sequence``)."""
    return _GatherSequence.apply(x, group, dim)


class UlyssesAttention(Attention):
    """``Attention`` on a sequence chunk: all-to-all to (full sequence, ``H/sp`` heads) and back.

    Installed by swapping an ``Attention`` instance's class, so parameter names and any tensor
    parallel plan on ``qkv`` / ``proj`` are kept; ``sp_group`` is set on the instance.
    """

    sp_group: ProcessGroup

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, L/sp, D] -> [B, L/sp, D]`` with attention over all ``L`` tokens."""
        b, n, _ = x.shape
        world = dist.get_world_size(self.sp_group)
        if self.n_heads % world:
            raise ValueError(
                f"Ulysses attention has {self.n_heads} local heads, not divisible by sp={world}; "
                "choose num_heads divisible by tp*sp"
            )
        # One all-to-all on the packed q, k, v: [B, L/sp, H, 3, hd] -> [B, L, H/sp, 3, hd].
        qkv = self.qkv(x).reshape(b, n, self.n_heads, 3, -1)
        qkv = seq_all_to_all(qkv, self.sp_group, scatter_dim=2, gather_dim=1)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # 3 x [B, H/sp, L, hd]
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        # [B, L, H/sp, hd] -> [B, L/sp, H, hd]: heads back together, sequence split again.
        out = seq_all_to_all(out.transpose(1, 2), self.sp_group, scatter_dim=1, gather_dim=2)
        return self.proj_drop(self.proj(out.reshape(b, n, -1)))


def sequence_sharded_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters whose gradients are per-chunk partial sums under SP (those of ``blocks``)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"{type(model).__name__} has no non-empty `blocks` ModuleList")
    return list(blocks.parameters())


SP_MODES = ("ulysses", "lss")


def apply_sequence_parallel(model: nn.Module, sp_mesh: DeviceMesh, mode: str = "ulysses") -> None:
    """Split the token sequence of ``model.blocks`` over the 1-D ``sp_mesh``, in place.

    Registers a pre-hook on the first block (scatter) and a hook on the last (gather) and turns
    every block's ``Attention`` into ``UlyssesAttention`` (``mode="ulysses"``: all-to-all, heads
    split) or ``LssAttention`` (``mode="lss"``: local queries, K/V all-gathered; see ``lss``).
    Call after tensor parallel (the collectives then move the tp-local heads) and before FSDP.
    """
    if mode not in SP_MODES:
        raise ValueError(f"unknown sequence-parallel mode {mode!r}; choose one of {SP_MODES}")
    if sp_mesh.ndim != 1:
        raise ValueError(f"sp_mesh must be 1-D (mesh['sp']), got {sp_mesh.ndim}-D")
    if getattr(model, "_sequence_parallel", False):
        raise ValueError("sequence parallel is already applied to this model; apply it once")
    sequence_sharded_parameters(model)  # clear error if there are no blocks
    group = sp_mesh.get_group()
    for block in model.blocks:
        attn = block.attn
        if type(attn) is not Attention:
            raise TypeError(
                f"sequence parallel expects Block.attn to be Attention, got {type(attn).__name__}"
            )
        attn.__class__ = UlyssesAttention if mode == "ulysses" else LssAttention
        attn.sp_group = group

    def scatter_hook(_module: nn.Module, args: tuple) -> tuple:
        return (scatter_sequence(args[0], group), *args[1:])

    def gather_hook(_module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
        return gather_sequence(out, group)

    model.blocks[0].register_forward_pre_hook(scatter_hook)
    model.blocks[-1].register_forward_hook(gather_hook)
    model._sequence_parallel = True
