"""Checkpoints: the model weights plus everything needed to use them on new data.

A checkpoint is self-contained: model architecture, variable and static names, normalisation
statistics, tiling, grid spacing and the config it was trained with, so inference never needs
the training run's other files.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from downscaler.io import atomic_path
from downscaler.model.reslim import Reslim, ReslimConfig


def save_checkpoint(path: str | Path, model: Reslim, **metadata: Any) -> None:
    """Write weights + architecture + metadata atomically."""
    payload = {
        "model_config": dataclasses.asdict(model.cfg),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **metadata,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> tuple[Reslim, dict]:
    """Rebuild the model from a checkpoint; returns (model in eval mode, the whole payload)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as err:
        raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err
    model = Reslim(ReslimConfig(**payload["model_config"]))
    model.load_state_dict(payload["model_state"])
    return model.eval(), payload


def file_sha256(path: str | Path) -> str:
    """Hash recorded in downstream metadata, so outputs name the exact weights used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
