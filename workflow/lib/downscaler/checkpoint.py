"""Checkpoints: the model weights plus everything needed to use them on new data.

Two kinds:
- the consolidated checkpoint (``save_checkpoint`` / ``write_checkpoint``, read by
  ``load_checkpoint``): one self-contained file with the full, unsharded weights, model
  architecture, variable and static names, normalisation statistics, tiling, grid spacing and the
  config it was trained with, so inference never needs the training run's other files;
- the resumable training state (``save_train_state`` / ``load_train_state``): a directory with
  model and optimizer state written by ``torch.distributed.checkpoint`` (every rank writes its own
  shards, so FSDP2 and tensor-parallel DTensors are never gathered) or by DeepSpeed's own
  checkpointing, plus the loop's position and each rank's RNG state. It is written under a
  temporary name and renamed into place, so an interruption leaves the previous state intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from downscaler.io import atomic_path
from downscaler.model.reslim import Reslim, ReslimConfig

STATE_NAME = "last"  # the committed resumable state inside the state directory
_OLD_SUFFIX = ".old"  # the previous state while the new one is renamed into place


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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded weights on rank 0's CPU (empty dict on other ranks).

    Works for a plain model, DDP (the ``module.`` prefix is dropped), FSDP2 and tensor-parallel
    DTensors (gathered). Collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def state_paths(state_dir: str | Path) -> tuple[Path, Path]:
    """(committed state, previous state kept while a new one is renamed in)."""
    root = Path(state_dir)
    return root / STATE_NAME, root / (STATE_NAME + _OLD_SUFFIX)


def find_train_state(state_dir: str | Path) -> Path | None:
    """The committed resumable state, or the previous one if a rename was interrupted."""
    for path in state_paths(state_dir):
        if (path / "meta.pt").is_file():
            return path
    return None


def save_train_state(
    state_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict,
    rank_state: dict,
    engine_save: Callable[[Path], None] | None = None,
) -> Path:
    """Write a resumable state collectively and commit it atomically; returns its path.

    ``meta`` (loop position, scheduler, best score; identical on all ranks) is written by rank 0
    last, so its presence marks a complete state; ``rank_state`` (RNG) by each rank.
    ``engine_save(dir)`` replaces torch.distributed.checkpoint for engines with their own format
    (DeepSpeed). Collective: every rank must call it.
    """
    root = Path(state_dir)
    final, old = state_paths(root)
    tmp = root / f".{STATE_NAME}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    if engine_save is not None:
        engine_save(tmp / "engine")
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    torch.save(rank_state, tmp / "rng" / f"rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        torch.save(meta, tmp / "meta.pt")
        _fsync_dir(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)  # keep the previous state until the new one is in place
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(root)
    _barrier()
    return final


def load_train_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    engine_load: Callable[[Path], None] | None = None,
) -> tuple[dict, dict | None]:
    """Load a state written by ``save_train_state`` into ``model``/``optimizer`` (in place).

    Returns (meta, this rank's RNG state or None if the state was saved with fewer ranks).
    Collective: every rank must call it.
    """
    path = Path(path)
    meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    if engine_load is not None:
        engine_load(path / "engine")
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        optimizers = optimizer if optimizer is not None else []
        model_sd, optim_sd = get_state_dict(model, optimizers)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizers, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
    rng_file = path / "rng" / f"rank{_rank()}.pt"
    rank_state = (torch.load(rng_file, map_location="cpu", weights_only=False)
                  if rng_file.is_file() else None)
    return meta, rank_state


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk, so a rename survives a node crash."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
