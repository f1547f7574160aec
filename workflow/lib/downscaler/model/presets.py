"""Named model sizes (ORBIT-2's published configurations) and a builder from variable names.

Sizes follow ORBIT-2 (embed / depth / heads, patch 2, mag 4). The parameter count in each name
is ORBIT-2's; ours lands near it (it depends on the number of variables and on ``mag``), see
``count_parameters``. "tiny" is for tests and the laptop demo.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .baseline import UpsampleViT
from .reslim import Reslim, ReslimConfig

__all__ = ["ARCHITECTURES", "PRESETS", "build_model", "count_parameters"]

# Model classes by config name (model.architecture): both take a ReslimConfig and the same call.
ARCHITECTURES: dict[str, type[nn.Module]] = {"reslim": Reslim, "upsample_vit": UpsampleViT}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 4,
        "patch_size": 2,
        "mag": 4,
        "decoder_depth": 1,
        "residual_channels": 16,
    },
    "9.5M": {"embed_dim": 256, "depth": 6, "num_heads": 4, "patch_size": 2, "mag": 4},
    "126M": {"embed_dim": 1024, "depth": 8, "num_heads": 16, "patch_size": 2, "mag": 4},
    "1B": {"embed_dim": 3072, "depth": 8, "num_heads": 24, "patch_size": 2, "mag": 4},
    "10B": {"embed_dim": 8192, "depth": 11, "num_heads": 32, "patch_size": 2, "mag": 4},
}


def build_model(
    preset: str,
    in_vars: Sequence[str],
    out_vars: Sequence[str],
    static_vars: Sequence[str] = (),
    architecture: str = "reslim",
    **overrides: Any,
) -> nn.Module:
    """Build a ``Reslim`` (or, with ``architecture="upsample_vit"``, the upsample-first ViT
    baseline) of size ``preset`` for the given variables; ``overrides`` replace any
    ``ReslimConfig`` field (e.g. ``mag=2``, ``dropout=0.1``).

    Build under ``with torch.device("meta"):`` to count or shard a large model without memory.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown model architecture {architecture!r} (config key "
                         f"model.architecture); choose one of {sorted(ARCHITECTURES)}")
    names = {"in_vars", "out_vars", "static_vars"}
    reserved = names & overrides.keys()
    if reserved:
        raise TypeError(f"pass {sorted(reserved)} as arguments, not as overrides")
    known = set(ReslimConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown model override(s) {unknown}; valid ones are {sorted(known - names)}"
        )
    params = {**PRESETS[preset], **overrides}
    cfg = ReslimConfig(
        in_vars=list(in_vars), out_vars=list(out_vars), static_vars=list(static_vars), **params
    )
    return ARCHITECTURES[architecture](cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements (works on the meta device too)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
