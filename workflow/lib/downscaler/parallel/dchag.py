"""D-CHAG: distributed cross-channel hierarchical aggregation (arXiv 2506.21411).

Reslim tokenises every variable and merges the ``C = V + S`` channel tokens of each location with
one cross-attention (``model.tokenizer`` -> ``model.aggregator``). With many channels this stage
dominates memory, and plain tensor parallelism replicates it on every rank. D-CHAG splits it over
the tensor-parallel (TP) group of size ``tp``:

1. The channels (the coarse inputs, then the fine statics, in model order) are cut into ``tp``
   contiguous blocks of ``C / tp``; rank ``r`` owns block ``r`` and patch-embeds ONLY those
   channels (with the original per-channel convolutions and channel embeddings).
2. Each rank reduces its block to one partial token per patch with PRIVATE weights:
   ``"linear"`` (D-CHAG-L, a Linear over the channel axis) or ``"cross"`` (D-CHAG-C, a
   cross-attention with one learned query), or the tree variants ``"tree-linear"`` /
   ``"tree-cross"``: the same reducers applied hierarchically, merging groups of ``TREE_GROUP``
   channel tokens level by level until one token is left (``ChannelTree``). The tree lives
   inside the private partition, so the collectives below are the same for every variant.
3. One all_gather over the TP group gives ``[B, tp, L, D]``. Its backward returns the LOCAL slice
   of the incoming gradient: that is exact because the final aggregation all-reduces the gradient
   of its (replicated) input; a reduce-scatter backward would over-count it by ``tp``.
4. A final cross-attention with one learned query merges the ``tp`` partial tokens into
   ``[B, L, D]``; its heads are split over the TP ranks (column-parallel ``q`` / ``kv``,
   row-parallel ``proj`` without bias, an all-reduce, then the bias added ONCE).

The two pitfalls of the public code are avoided by construction and tested: every rank reads its
own channel block (not channels ``0..C/tp-1``), and the row-parallel bias is added after the
all-reduce (not ``tp`` times).

``apply_dchag`` does this to a built ``Reslim`` from outside, in place: ``model.tokenizer`` becomes
a ``DchagTokenizer`` (steps 1-3, output ``[B, tp, L, D]``) and ``model.aggregator`` a
``DchagAggregator`` (step 4), so ``Reslim.forward`` is unchanged. D-CHAG is a different
architecture from Reslim's single aggregation, so exactness is checked against
``DchagReference``: the same D-CHAG maths on one process holding all ``tp`` partitions, with
``load_partition`` / ``gather_state`` to move weights (or gradients) between the two layouts.

Weights are initialised deterministically from the model they replace (its channel convolutions
and embeddings; its aggregator for the final cross-attention and, for ``"cross"`` /
``"tree-cross"``, for every private reducer; a linear reducer starts as the mean of its
inputs), so all ranks built from the same seed agree with ``DchagReference.from_model`` on the
same model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ..model.dchag_reference import (
    PRIVATE_PREFIXES,
    TREE_GROUP,
    VARIANTS,
    ChannelBlock,
    ChannelLinear,
    ChannelTree,
    DchagPartition,
    DchagReference,
    _check_heads_split,
    _check_variant,
    _quiet_rng,
    channel_blocks,
    reference_model,
    reference_reslim,
)
from ..model.layers import VariableAggregator
from ..model.reslim import Reslim

__all__ = [
    "TREE_GROUP",
    "VARIANTS",
    "ChannelBlock",
    "ChannelLinear",
    "ChannelTree",
    "DchagAggregator",
    "DchagPartition",
    "DchagReference",
    "DchagTokenizer",
    "apply_dchag",
    "PRIVATE_PREFIXES",
    "channel_blocks",
    "dchag_spec",
    "gather_state",
    "is_tp_distinct",
    "load_partition",
    "reference_model",
    "reference_reslim",
]



# --------------------------------------------------------------------------- channel partition
# --------------------------------------------------------------------------- collectives
# Gather along dim 0 into one tensor (one collective, NCCL-friendly); renamed in torch 2.13.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _GatherLocalGrad(torch.autograd.Function):
    """all_gather ``[B, L, D]`` into ``[B, tp, L, D]``; backward = this rank's slice."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, group: ProcessGroup) -> Tensor:  # noqa: D102
        ctx.rank = dist.get_rank(group)
        size = dist.get_world_size(group)
        out = local.new_empty((size * local.shape[0], *local.shape[1:]))
        _all_gather_single(out, local.contiguous(), group=group)
        return out.unflatten(0, (size, local.shape[0])).movedim(0, 1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        # The consumer (DchagAggregator) all-reduces its input gradient, so every rank already
        # holds the full gradient of the gathered tensor: the local slice is exact.
        return grad[:, ctx.rank].contiguous(), None


class _CopyToGroup(torch.autograd.Function):
    """Identity forward, all-reduce (sum) backward: entry of a column-parallel region."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:  # noqa: D102
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: exit of a row-parallel region."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:  # noqa: D102
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad, None


# --------------------------------------------------------------------------- sharded modules
class DchagTokenizer(nn.Module):
    """Replaces ``Reslim.tokenizer``: this rank's partition, then the all_gather over TP.

    ``forward(x, static) -> [B, tp, L, D]``: the partial token of every rank, in rank order.
    """

    def __init__(self, partition: DchagPartition, group: ProcessGroup) -> None:
        super().__init__()
        self.partition = partition
        self.group = group

    def forward(self, x: Tensor, static: Tensor) -> Tensor:
        """Embed + reduce this rank's channels, gather every rank's partial token."""
        return _GatherLocalGrad.apply(self.partition(x, static), self.group)


class DchagAggregator(nn.Module):
    """Replaces ``Reslim.aggregator``: one-query cross-attention over the ``tp`` partial tokens,
    heads split across the TP group.

    Holds this rank's ``n_heads = num_heads / tp`` heads: ``q`` and ``kv`` are column shards
    (head-major, as ``VariableAggregator`` packs them), ``proj`` a row shard without bias;
    ``proj_bias`` is the full bias, added once after the all-reduce. ``query`` is replicated.
    """

    def __init__(self, dim: int, num_heads: int, group: ProcessGroup) -> None:
        super().__init__()
        tp = dist.get_world_size(group)
        _check_heads_split(num_heads, tp)
        self.group = group
        self.n_heads = num_heads // tp
        local = dim // tp
        self.query = nn.Parameter(torch.empty(1, 1, dim))
        self.q = nn.Linear(dim, local)
        self.kv = nn.Linear(dim, 2 * local)
        self.proj = nn.Linear(local, dim, bias=False)
        self.proj_bias = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise like ``VariableAggregator`` (used by ``Reslim.init_weights`` after
        ``to_empty``); ``apply_dchag`` then loads the head shard of the model's aggregator."""
        nn.init.trunc_normal_(self.query, std=0.02)
        self.proj_bias.zero_()

    @torch.no_grad()
    def load_from_full(self, full: VariableAggregator, rank: int) -> None:
        """Take this rank's head shard of a full ``VariableAggregator``'s weights."""
        tp = dist.get_world_size(self.group)
        for name, tensor in shard_aggregator_state(full.state_dict(), rank, tp).items():
            self.get_parameter(name).copy_(tensor)

    def forward(self, tokens: Tensor) -> Tensor:
        """Aggregate ``tokens [B, tp, L, D]`` over the partial-token axis into ``[B, L, D]``."""
        b, c, n, d = tokens.shape
        tokens = _CopyToGroup.apply(tokens, self.group)  # its gradient is partial per rank
        query = _CopyToGroup.apply(self.query.to(tokens.dtype), self.group)
        seq = tokens.permute(0, 2, 1, 3).reshape(b * n, c, d)
        h = self.n_heads
        q = self.q(query).reshape(1, 1, h, -1).transpose(1, 2).expand(b * n, -1, -1, -1)
        kv = self.kv(seq).reshape(b * n, c, h, 2, -1).permute(3, 0, 2, 1, 4)
        k, v = kv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # [B*L, h_local, 1, hd]
        out = self.proj(out.transpose(1, 2).reshape(b, n, -1))
        # Bias after the all-reduce: adding it to each rank's partial sum would count it tp times.
        return _ReduceFromGroup.apply(out, self.group) + self.proj_bias.to(out.dtype)


def shard_aggregator_state(state: dict[str, Tensor], rank: int, tp: int) -> dict[str, Tensor]:
    """``DchagAggregator`` parameters of ``rank`` from a full ``VariableAggregator`` state dict."""
    d = state["q.weight"].shape[1]
    rows = slice(rank * d // tp, (rank + 1) * d // tp)
    kv_rows = slice(rank * 2 * d // tp, (rank + 1) * 2 * d // tp)
    return {
        "query": state["query"],
        "q.weight": state["q.weight"][rows],
        "q.bias": state["q.bias"][rows],
        "kv.weight": state["kv.weight"][kv_rows],
        "kv.bias": state["kv.bias"][kv_rows],
        "proj.weight": state["proj.weight"][:, rows],
        "proj_bias": state["proj.bias"],
    }


def _unshard_aggregator_state(shards: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Inverse of ``shard_aggregator_state`` over all ranks' shards (rank order)."""
    return {
        "query": shards[0]["query"],
        "q.weight": torch.cat([s["q.weight"] for s in shards], 0),
        "q.bias": torch.cat([s["q.bias"] for s in shards], 0),
        "kv.weight": torch.cat([s["kv.weight"] for s in shards], 0),
        "kv.bias": torch.cat([s["kv.bias"] for s in shards], 0),
        "proj.weight": torch.cat([s["proj.weight"] for s in shards], 1),
        "proj.bias": shards[0]["proj_bias"],
    }


# --------------------------------------------------------------------------- public entry points
def _as_group(tp_mesh: DeviceMesh | ProcessGroup) -> ProcessGroup:
    """The process group of a 1-D TP ``DeviceMesh`` (or the group itself)."""
    if isinstance(tp_mesh, DeviceMesh):
        if tp_mesh.ndim != 1:
            raise ValueError(
                f"apply_dchag needs the 1-D tensor-parallel sub-mesh, got a {tp_mesh.ndim}-D mesh "
                f"{tp_mesh.mesh_dim_names}; pass mesh['tp']"
            )
        return tp_mesh.get_group()
    if isinstance(tp_mesh, ProcessGroup):
        return tp_mesh
    raise TypeError(
        f"tp_mesh must be a 1-D DeviceMesh (mesh['tp']) or a ProcessGroup, got "
        f"{type(tp_mesh).__name__}"
    )


def apply_dchag(
    model: Reslim, tp_mesh: DeviceMesh | ProcessGroup, variant: str = "linear"
) -> Reslim:
    """Replace ``model``'s tokenisation + variable aggregation by D-CHAG over the TP group.

    In place (returns ``model``): this rank keeps only its channel block's embeddings, a private
    reducer (``variant``: one of ``VARIANTS``) and its head shard of the final
    aggregation. Every TP rank must call it on an identically initialised model and feed the same
    ``x`` / ``static``. Apply it before tensor parallelism of the blocks and before FSDP/DDP.
    """
    _check_variant(variant)
    if not isinstance(model, Reslim):
        raise TypeError(f"apply_dchag needs a Reslim, got {type(model).__name__}")
    group = _as_group(tp_mesh)
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    cfg = model.cfg
    blocks = channel_blocks(len(cfg.in_vars), len(cfg.static_vars), tp)
    _check_heads_split(cfg.num_heads, tp)
    partition = DchagPartition.from_model(model, blocks[rank], variant)
    ref = model.pos_scale
    with _quiet_rng(ref.device), torch.device(ref.device):  # overwritten below
        aggregator = DchagAggregator(cfg.embed_dim, cfg.num_heads, group)
    aggregator.to(dtype=ref.dtype)
    aggregator.load_from_full(model.aggregator, rank)
    model.tokenizer = DchagTokenizer(partition, group)
    model.aggregator = aggregator
    return model


def is_tp_distinct(name: str) -> bool:
    """Whether parameter ``name`` (of the unwrapped model) holds different values on each TP rank
    after ``apply_dchag``: the private partition and the head shards of the final aggregation
    (``query`` and ``proj_bias`` are replicated). A global gradient norm sums these over TP."""
    return name.startswith(
        ("tokenizer.partition.", "aggregator.q.", "aggregator.kv.", "aggregator.proj.")
    )


def dchag_spec(model: nn.Module) -> dict[str, Any] | None:
    """``{"variant", "tp"}`` of a model after ``apply_dchag`` (through wrappers), else None."""
    try:
        tok, _ = _dchag_modules(model)
    except TypeError:
        return None
    return {"variant": tok.partition.variant, "tp": dist.get_world_size(tok.group)}


def _dchag_modules(model: nn.Module) -> tuple[DchagTokenizer, DchagAggregator]:
    """The D-CHAG modules of a model after ``apply_dchag`` (also through DDP/compile wrappers)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    tok, agg = getattr(inner, "tokenizer", None), getattr(inner, "aggregator", None)
    if not isinstance(tok, DchagTokenizer) or not isinstance(agg, DchagAggregator):
        raise TypeError(
            "model has no D-CHAG tokenizer/aggregator; call apply_dchag(model, mesh['tp']) first"
        )
    return tok, agg


@torch.no_grad()
def load_partition(model: nn.Module, reference: DchagReference) -> None:
    """Copy this rank's share of ``reference``'s weights into ``model`` (after ``apply_dchag``).

    The rank is the model's rank in its TP group; ``reference.tp`` must equal the group size.
    """
    tok, agg = _dchag_modules(model)
    tp, rank = dist.get_world_size(tok.group), dist.get_rank(tok.group)
    if reference.tp != tp:
        raise ValueError(
            f"reference was built for tp={reference.tp} but the model's TP group has {tp} ranks; "
            "build DchagReference with the same tp"
        )
    if reference.variant != tok.partition.variant:
        raise ValueError(
            f"reference variant {reference.variant!r} != model variant "
            f"{tok.partition.variant!r}; use the same D-CHAG variant for both"
        )
    tok.partition.load_state_dict(reference.tokenizer.partitions[rank].state_dict())
    agg.load_from_full(reference.aggregator, rank)


def gather_state(model: nn.Module, *, grads: bool = False) -> dict[str, Tensor]:
    """The D-CHAG weights (or their gradients) of all TP ranks, keyed as ``DchagReference``'s.

    Collective over the TP group (and, for FSDP2-wrapped parameters, their data-parallel mesh):
    every rank must call it; every rank gets the full dict (``tokenizer.partitions.<r>.*`` and
    ``aggregator.*``), on the CPU. With ``grads=True`` missing gradients are returned as zeros.
    """
    tok, agg = _dchag_modules(model)

    def values(module: nn.Module) -> dict[str, Tensor]:
        out = {}
        for name, p in module.named_parameters():
            t = p.grad if grads else p
            if t is None:
                t = torch.zeros_like(p)
            if isinstance(t, DTensor):  # wrapped by FSDP2 over the data-parallel mesh
                t = t.full_tensor()
            out[name] = t.detach().cpu().clone()
        return out

    mine = {"partition": values(tok.partition), "aggregator": values(agg)}
    everyone: list[Any] = [None] * dist.get_world_size(tok.group)
    dist.all_gather_object(everyone, mine, group=tok.group)
    state = {}
    for r, item in enumerate(everyone):
        for name, t in item["partition"].items():
            state[f"tokenizer.partitions.{r}.{name}"] = t
    full = _unshard_aggregator_state([item["aggregator"] for item in everyone])
    state.update({f"aggregator.{name}": t for name, t in full.items()})
    return state
