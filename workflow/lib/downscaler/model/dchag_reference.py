"""The single-process D-CHAG model: what ``parallel.dchag.apply_dchag`` computes on ``tp`` ranks,
on one process holding all ``tp`` channel partitions (see ``parallel.dchag`` for the method).

Plain modules only, no distributed code (it lives with the models for that reason): inference
rebuilds a D-CHAG checkpoint with
``reference_model`` (``downscaler.checkpoint.load_checkpoint``), and the parity tests compare the
distributed model with it. Weights are initialised deterministically from the model they replace,
so ``DchagReference.from_model`` agrees with ``apply_dchag`` on the same model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .layers import VariableAggregator, VariableTokenizer
from .reslim import Reslim

__all__ = [
    "PRIVATE_PREFIXES",
    "TREE_GROUP",
    "VARIANTS",
    "ChannelBlock",
    "ChannelLinear",
    "ChannelTree",
    "DchagPartition",
    "DchagReference",
    "channel_blocks",
    "reference_model",
    "reference_reslim",
]

VARIANTS = ("linear", "cross", "tree-linear", "tree-cross")
# Channels merged per node of the tree variants (a binary tree: log2(k) levels for k channels).
TREE_GROUP = 2
# State-dict prefixes of the modules apply_dchag replaces: per-rank (not replicated) weights.
PRIVATE_PREFIXES = ("tokenizer.", "aggregator.")


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


class ChannelTree(nn.Module):
    """Tree reducer: ``tokens [B, k, L, D] -> [B, L, D]`` by merging groups of ``group`` channel
    tokens level by level (the "tree" D-CHAG variants) until one token is left.

    Level ``i`` cuts its input tokens, in channel order, into consecutive groups of ``group``
    (the last one may be smaller) and reduces each with its own reducer from ``make(n)`` (``n``:
    the group's size); the group tokens are the next level's input. Each node sees only a few
    tokens, so no single step holds attention (or a Linear) over the whole block.
    """

    def __init__(self, n_channels: int, make: Callable[[int], nn.Module], group: int) -> None:
        super().__init__()
        if group < 2:
            raise ValueError(f"a channel tree needs groups of >= 2 channels, got group={group}")
        self.group = group
        self.levels = nn.ModuleList()
        n = n_channels
        while n > 1:
            sizes = [min(group, n - lo) for lo in range(0, n, group)]
            self.levels.append(nn.ModuleList(make(size) for size in sizes))
            n = len(sizes)

    def forward(self, tokens: Tensor) -> Tensor:
        """Reduce ``[B, k, L, D]`` over ``k``, ``group`` channels at a time."""
        for level in self.levels:
            groups = tokens.split(self.group, dim=1)
            tokens = torch.stack([node(g) for node, g in zip(level, groups, strict=True)], dim=1)
        return tokens[:, 0]


def _reducer(variant: str, n_channels: int, dim: int, num_heads: int) -> nn.Module:
    """The private reducer of ``variant`` over a block of ``n_channels`` channel tokens."""
    if variant == "linear":
        return ChannelLinear(n_channels)
    if variant == "cross":
        return VariableAggregator(dim, num_heads)
    if variant == "tree-linear":
        return ChannelTree(n_channels, ChannelLinear, TREE_GROUP)
    return ChannelTree(n_channels, lambda _n: VariableAggregator(dim, num_heads), TREE_GROUP)


class DchagPartition(nn.Module):
    """One rank's private D-CHAG stage: embed its channel block, reduce it to one token per patch.

    ``forward(x [B, V, h, w], static [B, S, mag*h, mag*w]) -> [B, L, D]``. Holds
    ``inputs`` / ``statics`` (``VariableTokenizer`` over the block's inputs / statics, or None)
    and ``reduce`` (``ChannelLinear``, ``VariableAggregator`` or a ``ChannelTree`` of either).
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
        self.reduce = _reducer(variant, n, dim, num_heads)

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
        # Cross-attention reducers (every node of a tree-cross) start as the model's aggregator;
        # linear ones keep their mean initialisation.
        for module in part.reduce.modules():
            if isinstance(module, VariableAggregator):
                module.load_state_dict(model.aggregator.state_dict())
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


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown D-CHAG variant={variant!r}; choose 'linear' (D-CHAG-L, a Linear over the "
            "channel axis), 'cross' (D-CHAG-C, cross-attention with one learned query), or "
            "'tree-linear' / 'tree-cross' (the same reducers merging channels in a binary tree)"
        )


def _check_heads_split(num_heads: int, tp: int) -> None:
    if num_heads % tp:
        raise ValueError(
            f"D-CHAG splits the final aggregation's num_heads={num_heads} over tp={tp} ranks; "
            "choose a model whose num_heads is divisible by tp (or a tp that divides it)"
        )


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
