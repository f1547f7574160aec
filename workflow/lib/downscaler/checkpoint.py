"""Model checkpoints for inference: the weights plus everything needed to use them on new data.

The consolidated checkpoint (``save_checkpoint`` / ``write_checkpoint``, read by
``load_checkpoint``) is one self-contained file with the full, unsharded weights, model
architecture, variable and static names, normalisation statistics, tiling, grid spacing and the
config it was trained with, so inference never needs the training run's other files. This module
imports no distributed code: a D-CHAG checkpoint (``dchag: {"variant", "tp"}``) holds the
single-process D-CHAG model, rebuilt by ``model.dchag_reference`` (plain modules only).

The resumable training state (optimizer, sampler position, RNG, per-rank shards) is another job
and another module: ``parallel.train_state``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from downscaler.io import atomic_path
from downscaler.model.presets import ARCHITECTURES
from downscaler.model.reslim import Reslim, ReslimConfig


def save_checkpoint(path: str | Path, model: Reslim, **metadata: Any) -> None:
    """Write weights + architecture + metadata atomically (a plain, unwrapped model)."""
    write_checkpoint(path, dataclasses.asdict(model.cfg), model.state_dict(), **metadata)


def write_checkpoint(path: str | Path, model_config: dict, model_state: dict,
                     **metadata: Any) -> None:
    """Write a consolidated checkpoint from a full (unsharded) state dict, atomically."""
    payload = {
        "model_config": dict(model_config),
        "model_state": {k: v.detach().cpu() for k, v in model_state.items()},
        **metadata,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, architecture: str | None = None) -> tuple[Reslim, dict]:
    """Rebuild the model from a checkpoint; returns (model in eval mode, the whole payload).

    The class is the one the checkpoint records (``architecture``: reslim or upsample_vit);
    ``architecture`` names the one the caller expects (needed only for files that predate the
    key) and a mismatch is an error, not a state-dict failure deep inside torch."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as err:
        raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err
    recorded = payload.get("architecture")
    if architecture and recorded and recorded != architecture:
        raise ValueError(f"checkpoint {path} holds a {recorded} model, not {architecture}: "
                         "give the checkpoint of the model you meant")
    name = architecture or recorded or "reslim"
    if name not in ARCHITECTURES:
        raise ValueError(f"checkpoint {path}: unknown architecture {name!r}; "
                         f"choose one of {sorted(ARCHITECTURES)}")
    model = ARCHITECTURES[name](ReslimConfig(**payload["model_config"]))
    spec = payload.get("dchag")
    if spec:
        # Lazy: D-CHAG is optional; its reference form is a plain Reslim with other submodules.
        from downscaler.model.dchag_reference import reference_model

        model = reference_model(model, int(spec["tp"]), spec["variant"])
    model.load_state_dict(payload["model_state"])
    return model.eval(), payload


def file_sha256(path: str | Path) -> str:
    """Hash recorded in downstream metadata, so outputs name the exact weights used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_matching_weights(model: Reslim, path: str | Path) -> dict[str, list[str]]:
    """Initialise ``model`` from a checkpoint trained on other tiles or variables (fine-tuning).

    Per-variable tokenizer weights (``tokenizer.inputs`` / ``tokenizer.statics``: one conv and
    one channel-embedding row per variable) are matched by variable name, so a shared variable
    keeps its weights wherever it sits in the new list. Every other tensor is copied when its
    name and shape match and left at its fresh initialisation otherwise (e.g. heads for a
    different number of output variables). The positional embedding is computed from the tile
    size on the fly, so a new tile size needs nothing. Returns {"loaded", "skipped", "new"}.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        source, old_cfg = payload["model_state"], payload["model_config"]
    except (OSError, RuntimeError, KeyError) as err:
        raise RuntimeError(f"config key train.init_from: cannot read a checkpoint from {path}: "
                           f"{err}; point it at a checkpoint.pt written by the train rule") from err
    mapped = dict(source)
    for part, key in (("inputs", "in_vars"), ("statics", "static_vars")):
        old_names, new_names = old_cfg.get(key, []), getattr(model.cfg, key)
        prefix = f"tokenizer.{part}."
        mapped = {k: v for k, v in mapped.items() if not k.startswith(prefix)}
        for j, name in enumerate(new_names):
            if name not in old_names:
                continue
            i = old_names.index(name)
            for suffix in ("weight", "bias"):
                old_key = f"{prefix}embeds.{i}.{suffix}"
                if old_key in source:
                    mapped[f"{prefix}embeds.{j}.{suffix}"] = source[old_key]
        old_rows = source.get(prefix + "channel_embed")
        target = model.state_dict().get(prefix + "channel_embed")
        if old_rows is not None and target is not None:
            rows = target.clone()
            for j, name in enumerate(new_names):
                if name in old_names and old_rows.shape[1:] == rows.shape[1:]:
                    rows[j] = old_rows[old_names.index(name)]
            mapped[prefix + "channel_embed"] = rows
    own = model.state_dict()
    usable = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return {
        "loaded": sorted(usable),
        "skipped": sorted(k for k in mapped if k not in usable),
        "new": sorted(k for k in own if k not in usable),
    }
