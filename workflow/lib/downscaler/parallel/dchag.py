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
   cross-attention with one learned query).
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
and embeddings; its aggregator for the final cross-attention and, for ``"cross"``, for every
private reducer; the ``"linear"`` reducer starts as the mean of the block), so all ranks built
from the same seed agree with ``DchagReference.from_model`` on the same model.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ..model.layers import VariableAggregator, VariableTokenizer
from ..model.reslim import Reslim

__all__ = [
    "VARIANTS",
    "ChannelBlock",
    "ChannelLinear",
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

VARIANTS = ("linear", "cross")
# State-dict prefixes of the modules apply_dchag replaces: per-rank (not replicated) weights.
PRIVATE_PREFIXES = ("tokenizer.", "aggregator.")


# --------------------------------------------------------------------------- channel partition
class ChannelBlock(NamedTuple):
    """The channels one rank owns, as slices ``in_lo:in_hi`` of ``x`` and ``st_lo:st_hi`` of
    ``static``.

    Global channel ``c`` is input ``c`` when ``c < V`` and static ``c - V`` otherwise, so a
    contiguous block of global channels is one slice of each.
    """

    in_lo: int
    in_hi: int
    st_lo: int
    st_hi: int

    @property
    def n_inputs(self) -> int:
        """Number of coarse input variables in the block."""
        return self.in_hi - self.in_lo

    @property
    def n_statics(self) -> int:
        """Number of fine static fields in the block."""
        return self.st_hi - self.st_lo


def channel_blocks(n_inputs: int, n_statics: int, tp: int) -> list[ChannelBlock]:
    """Split ``C = n_inputs + n_statics`` channels into ``tp`` contiguous blocks of ``C / tp``.

    Raises ``ValueError`` naming the fix when ``tp`` does not divide ``C``.
    """
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be an integer >= 1, got {tp!r}")
    total = n_inputs + n_statics
    if total % tp:
        raise ValueError(
            f"D-CHAG needs the channel count (in_vars + static_vars = {n_inputs} + {n_statics} "
            f"= {total}) divisible by the tensor-parallel size tp={tp}; choose a tp that divides "
            f"{total} or add/drop variables"
        )
    per = total // tp
    blocks = []
    for r in range(tp):
        lo, hi = r * per, (r + 1) * per
        blocks.append(
            ChannelBlock(
                min(lo, n_inputs),
                min(hi, n_inputs),
                max(lo, n_inputs) - n_inputs,
                max(hi, n_inputs) - n_inputs,
            )
        )
    return blocks


# --------------------------------------------------------------------------- private partition
class ChannelLinear(nn.Module):
    """D-CHAG-L reducer: ``tokens [B, k, L, D] -> [B, L, D]`` as ``sum_c w_c tokens_c + b``.

    A ``Linear(k, 1)`` over the channel axis (shared across the embedding dimension), initialised
    to the mean of the ``k`` channel tokens.
    """

    def __init__(self, n_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_channels, 1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Start as the plain mean over the block (a neutral, deterministic initialisation)."""
        self.linear.weight.fill_(1.0 / self.linear.in_features)
        self.linear.bias.zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        """Reduce ``[B, k, L, D]`` over ``k``."""
        return self.linear(tokens.movedim(1, -1)).squeeze(-1)


class DchagPartition(nn.Module):
    """One rank's private D-CHAG stage: embed its channel block, reduce it to one token per patch.

    ``forward(x [B, V, h, w], static [B, S, mag*h, mag*w]) -> [B, L, D]``. Holds
    ``inputs`` / ``statics`` (``VariableTokenizer`` over the block's inputs / statics, or None)
    and ``reduce`` (``ChannelLinear`` or ``VariableAggregator``).
    """

    def __init__(
        self,
        block: ChannelBlock,
        dim: int,
        patch: int,
        mag: int,
        num_heads: int,
        variant: str,
    ) -> None:
        super().__init__()
        _check_variant(variant)
        self.block = block
        self.variant = variant
        self.inputs = VariableTokenizer(block.n_inputs, dim, patch) if block.n_inputs else None
        self.statics = (
            VariableTokenizer(block.n_statics, dim, patch * mag) if block.n_statics else None
        )
        n = block.n_inputs + block.n_statics
        self.reduce: nn.Module = (
            ChannelLinear(n) if variant == "linear" else VariableAggregator(dim, num_heads)
        )

    @classmethod
    def from_model(cls, model: Reslim, block: ChannelBlock, variant: str) -> DchagPartition:
        """Build the partition of ``block`` with ``model``'s own channel weights (deep copies)."""
        cfg = model.cfg
        src = model.tokenizer
        if not isinstance(getattr(src, "inputs", None), VariableTokenizer):
            raise TypeError(
                "D-CHAG needs a Reslim with its original tokenizer, but this model's was already "
                "replaced (apply D-CHAG once, to a freshly built model)"
            )
        ref = model.pos_scale
        # Built where the model lives and without touching the global RNG: every weight is
        # overwritten below, and a D-CHAG run should draw the same dropout masks as a plain one.
        with _quiet_rng(ref.device), torch.device(ref.device):
            part = cls(block, cfg.embed_dim, cfg.patch_size, cfg.mag, cfg.num_heads, variant)
        part.to(dtype=ref.dtype)
        _copy_tokenizer_rows(part.inputs, src.inputs, block[0], block[1])
        _copy_tokenizer_rows(part.statics, src.statics, block[2], block[3])
        if variant == "cross":
            part.reduce.load_state_dict(model.aggregator.state_dict())
        return part

    def forward(self, x: Tensor, static: Tensor) -> Tensor:
        """Tokenise this block's channels of ``x`` / ``static`` and reduce them: ``[B, L, D]``."""
        in_lo, in_hi, st_lo, st_hi = self.block
        parts = []
        if self.inputs is not None:
            parts.append(self.inputs(x[:, in_lo:in_hi]))
        if self.statics is not None:
            parts.append(self.statics(static[:, st_lo:st_hi]))
        tokens = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.reduce(tokens)


def _quiet_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Fork the RNG of ``device`` (and the CPU's) so building throw-away init leaves it as is."""
    cuda = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


@torch.no_grad()
def _copy_tokenizer_rows(
    dst: VariableTokenizer | None, src: VariableTokenizer | None, lo: int, hi: int
) -> None:
    """Copy channels ``lo:hi`` of ``src`` (convolutions + channel embedding) into ``dst``."""
    if dst is None or src is None:  # an empty slice: the block has no channels of this kind
        return
    for i, conv in enumerate(dst.embeds):
        conv.load_state_dict(src.embeds[lo + i].state_dict())
    dst.channel_embed.copy_(src.channel_embed[lo:hi])


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
def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown D-CHAG variant={variant!r}; choose 'linear' (D-CHAG-L, a Linear over the "
            "channel axis) or 'cross' (D-CHAG-C, cross-attention with one learned query)"
        )


def _check_heads_split(num_heads: int, tp: int) -> None:
    if num_heads % tp:
        raise ValueError(
            f"D-CHAG splits the final aggregation's num_heads={num_heads} over tp={tp} ranks; "
            "choose a model whose num_heads is divisible by tp (or a tp that divides it)"
        )


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
    reducer (``variant``: ``"linear"`` or ``"cross"``) and its head shard of the final
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


class _ReferencePartials(nn.Module):
    """Single-process stand-in for ``DchagTokenizer``: every partition, stacked in rank order."""

    def __init__(self, partitions: list[DchagPartition]) -> None:
        super().__init__()
        self.partitions = nn.ModuleList(partitions)

    def forward(self, x: Tensor, static: Tensor) -> Tensor:
        """``[B, tp, L, D]``: what the all_gather of ``DchagTokenizer`` produces."""
        return torch.stack([p(x, static) for p in self.partitions], dim=1)


class DchagReference(nn.Module):
    """The D-CHAG maths on one process, holding the weights of all ``tp`` partitions.

    ``tokenizer`` (the ``tp`` partitions, output ``[B, tp, L, D]``) and ``aggregator`` (a full
    ``VariableAggregator`` over the partial tokens) mirror the attributes ``apply_dchag``
    installs, so state-dict keys line up with a Reslim's. ``forward(x, static) -> [B, L, D]``.
    Build it with ``from_model``.
    """

    def __init__(
        self, partitions: list[DchagPartition], aggregator: VariableAggregator, variant: str
    ) -> None:
        super().__init__()
        _check_variant(variant)
        self.tp, self.variant = len(partitions), variant
        self.tokenizer = _ReferencePartials(partitions)
        self.aggregator = aggregator

    @classmethod
    def from_model(cls, model: Reslim, tp: int, variant: str = "linear") -> DchagReference:
        """What ``apply_dchag`` builds on ``tp`` ranks from ``model``, on one process."""
        _check_variant(variant)
        cfg = model.cfg
        blocks = channel_blocks(len(cfg.in_vars), len(cfg.static_vars), tp)
        _check_heads_split(cfg.num_heads, tp)
        partitions = [DchagPartition.from_model(model, b, variant) for b in blocks]
        return cls(partitions, copy.deepcopy(model.aggregator), variant)

    def forward(self, x: Tensor, static: Tensor) -> Tensor:
        """Embed every block, reduce each privately, aggregate the ``tp`` partial tokens."""
        return self.aggregator(self.tokenizer(x, static))


def reference_reslim(model: Reslim, reference: DchagReference) -> Reslim:
    """A deep copy of ``model`` whose tokenizer / aggregator are (copies of) ``reference``'s.

    The single-process twin of ``apply_dchag(model, ...)`` on ``reference.tp`` ranks.
    """
    twin = copy.deepcopy(model)
    twin.tokenizer = copy.deepcopy(reference.tokenizer)
    twin.aggregator = copy.deepcopy(reference.aggregator)
    return twin


def reference_model(model: Reslim, tp: int, variant: str) -> Reslim:
    """The single-process Reslim with the D-CHAG maths of ``apply_dchag`` on ``tp`` ranks.

    Used to rebuild a consolidated D-CHAG checkpoint: its state dict has the keys of
    ``gather_state`` (plus the replicated Reslim weights).
    """
    return reference_reslim(model, DchagReference.from_model(model, tp, variant))


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
