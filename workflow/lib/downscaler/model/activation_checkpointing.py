"""Activation checkpointing applied from outside the model (torchtitan's ``apply_ac`` shape).

Each transformer ``Block`` is switched, in place, to a subclass whose forward runs the original
forward under ``torch.utils.checkpoint`` (non-reentrant): activations inside the block are
dropped after forward and recomputed in backward. Swapping the instance's class rather than
wrapping it in a new module keeps every parameter name (``blocks.0.attn.qkv.weight``), so
tensor-parallel plans, FSDP and saved checkpoints see the same model before and after, and the
order in which parallelisms are applied does not matter.
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import Block

__all__ = ["apply_activation_checkpointing", "is_checkpointed"]

_WRAPPED: dict[type, type] = {}


class _CheckpointedForward:
    """Mixin: run the next class's ``forward`` under non-reentrant activation checkpointing."""

    def forward(self, *args, **kwargs):
        """Same signature and result as the wrapped block's forward."""
        # preserve_rng_state (default) replays dropout masks identically in the recomputation.
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


def _checkpointed_class(cls: type) -> type:
    """The (cached) checkpointed subclass of ``cls``, so isinstance checks keep working."""
    if cls not in _WRAPPED:
        name = f"Checkpointed{cls.__name__}"
        wrapped = type(name, (_CheckpointedForward, cls), {"__module__": __name__})
        # Register it under its name here so pickling (torch.save, spawn) can find the class.
        if name not in globals():
            globals()[name] = wrapped
        _WRAPPED[cls] = wrapped
    return _WRAPPED[cls]


def is_checkpointed(module: nn.Module) -> bool:
    """True when ``module`` runs under activation checkpointing."""
    return isinstance(module, _CheckpointedForward)


def apply_activation_checkpointing(
    model: nn.Module, block_types: tuple[type[nn.Module], ...] = (Block,)
) -> int:
    """Checkpoint every submodule of ``model`` that is one of ``block_types``, in place.

    Idempotent; returns the number of blocks now checkpointed. Outputs and gradients are
    identical to the unwrapped model; only peak activation memory (and extra compute) change.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    count = 0
    for module in model.modules():
        if not isinstance(module, block_types):
            continue
        if not is_checkpointed(module):
            module.__class__ = _checkpointed_class(type(module))
        count += 1
    if count == 0:
        names = ", ".join(t.__name__ for t in block_types)
        raise ValueError(
            f"no {names} found in {type(model).__name__}; pass block_types= the transformer "
            "block class(es) to checkpoint"
        )
    return count
