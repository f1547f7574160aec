"""The downscaling models (Reslim, the upsample-first baseline), losses, presets and AC.

Plain ``nn.Module``s that know nothing of parallelism; it is applied from outside.
"""

from .activation_checkpointing import apply_activation_checkpointing
from .baseline import UpsampleViT
from .loss import latitude_weights, mse_loss, tv_regularised_loss
from .presets import PRESETS, build_model, count_parameters
from .reslim import Reslim, ReslimConfig

__all__ = [
    "PRESETS",
    "Reslim",
    "ReslimConfig",
    "UpsampleViT",
    "apply_activation_checkpointing",
    "build_model",
    "count_parameters",
    "latitude_weights",
    "mse_loss",
    "tv_regularised_loss",
]
