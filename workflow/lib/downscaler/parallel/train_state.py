"""The resumable training state, and the consolidated weights of a model as trained.

- ``save_train_state`` / ``load_train_state``: a directory with model and optimizer state
  written by ``torch.distributed.checkpoint`` (every rank writes its own shards, so FSDP2 and
  tensor-parallel DTensors are never gathered) or by DeepSpeed's own checkpointing, plus the
  loop's state (``meta``) and each rank's RNG state. It is written under a temporary name and
  renamed into place, so an interruption leaves the previous state intact.
- ``full_model_state``: the full weights of a parallelized model on rank 0, for the inference
  checkpoint (``downscaler.checkpoint.write_checkpoint``).

D-CHAG models hold per-rank channel weights. Their consolidated state is the single-process
reference form (``model.dchag_reference.reference_model``; ``dchag_metadata`` says which); in the
resumable state those weights (and their optimizer state) go to one file per rank, since
torch.distributed.checkpoint would keep only one copy of a tensor that has the same name on every
rank.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STATE_NAME = "last"  # the committed resumable state inside the state directory
_OLD_SUFFIX = ".old"  # the previous state while the new one is renamed into place


def dchag_metadata(model: nn.Module) -> dict | None:
    """``{"variant", "tp"}`` for a model trained with D-CHAG (the checkpoint's ``dchag`` key),
    None otherwise."""
    if not dist.is_initialized():  # D-CHAG needs a process group
        return None
    try:
        from .dchag import dchag_spec
    except ImportError:
        return None
    return dchag_spec(model)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded weights on rank 0's CPU (empty dict on other ranks).

    Works for a plain model, DDP (the ``module.`` prefix is dropped), FSDP2 and tensor-parallel
    DTensors (gathered). A D-CHAG model gives the state of its single-process reference form
    (``dchag_metadata`` says which). Collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if dchag_metadata(model) is None:
        return state
    from .dchag import PRIVATE_PREFIXES, gather_state

    # The per-rank tokenizer/aggregator entries above are only rank 0's share: replace them by
    # every rank's, keyed as the reference model's.
    private = gather_state(model)  # collective over the tp group
    if _rank() != 0:
        return {}
    state = {k: v for k, v in state.items() if not k.startswith(PRIVATE_PREFIXES)}
    state.update(private)
    return state


def full_pipeline_state(stage: nn.Module, pp_group: dist.ProcessGroup,
                        leader: bool) -> dict[str, torch.Tensor]:
    """The full weights of a pipelined model on rank 0 (empty dict elsewhere): every stage's
    full (tensor-parallel gathered) state, sent by its ``leader`` (data-parallel, tp and sp
    rank 0) over the pipeline group. The stages name their parameters as the whole model does,
    so the union is the model's state dict. Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True)  # every rank joins the tp gathers
    state = {k: v.detach().cpu().clone() for k, v in get_model_state_dict(stage,
                                                                         options=options).items()}
    if not leader:
        return {}
    parts: list | None = [None] * dist.get_world_size(pp_group) if _rank() == 0 else None
    dist.gather_object(state, parts, group=pp_group, group_dst=0)
    return {k: v for part in parts for k, v in part.items()} if _rank() == 0 else {}


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
    flatten_optim: bool = False,
) -> Path:
    """Write a resumable state collectively and commit it atomically; returns its path.

    ``meta`` (loop position, scheduler, best score; identical on all ranks) is written by rank 0
    last, so its presence marks a complete state; ``rank_state`` (RNG) by each rank.
    ``engine_save(dir)`` replaces torch.distributed.checkpoint for engines with their own format
    (DeepSpeed). ``flatten_optim``: optimizer state keyed per parameter name, param groups
    included (pipeline stages: each holds other parameters, and an unflattened ``param_groups``
    would be saved once, from rank 0). Collective: every rank must call it.
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

        model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [],
                                            options=_options(flatten_optim))
        private = _pop_private(model, model_sd, optim_sd)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        if private is not None:
            (tmp / "dchag").mkdir(exist_ok=True)
            torch.save(_local_copy(private), tmp / "dchag" / f"rank{_rank()}.pt")
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
    flatten_optim: bool = False,
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
        model_sd, optim_sd = get_state_dict(model, optimizers, options=_options(flatten_optim))
        private = _pop_private(model, model_sd, optim_sd)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        if private is not None:
            _load_private(path, private, state["model"], state["optim"])
        set_state_dict(model, optimizers, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=_options(flatten_optim))
    rng_file = path / "rng" / f"rank{_rank()}.pt"
    rank_state = (torch.load(rng_file, map_location="cpu", weights_only=False)
                  if rng_file.is_file() else None)
    return meta, rank_state


def _options(flatten_optim: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=flatten_optim)


def _local_copy(value: Any) -> Any:
    """A CPU copy of this rank's part of ``value`` (DTensor shards, nested dicts)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.to_local()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _local_copy(v) for k, v in value.items()}
    return value


def _pop_private(model: nn.Module, model_sd: dict, optim_sd: dict) -> dict | None:
    """Take the D-CHAG per-rank entries out of the state dicts (in place).

    Returns ``{"world", "model", "optim"}``, the removed entries as they are (tensors of the
    state dicts, DTensors included), or None for a model without D-CHAG.
    """
    if dchag_metadata(model) is None:
        return None
    from .dchag import PRIVATE_PREFIXES

    optim_state = optim_sd.get("state", {}) if isinstance(optim_sd, dict) else {}
    model_keys = [k for k in model_sd if k.startswith(PRIVATE_PREFIXES)]
    optim_keys = [k for k in optim_state if k.startswith(PRIVATE_PREFIXES)]
    # Each rank's param_groups name its own private parameters; the saved copy is rank 0's.
    groups = [list(g["params"]) for g in optim_sd.get("param_groups", [])]
    return {"world": dist.get_world_size(), "groups": groups,
            "model": {k: model_sd.pop(k) for k in model_keys},
            "optim": {k: optim_state.pop(k) for k in optim_keys}}


@torch.no_grad()
def _copy_into(dst: Any, src: Any, name: str) -> Any:
    """``src`` (saved local copy) into the template ``dst`` in place where it is a tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(dst, dict):
        return {k: _copy_into(dst[k], src[k], f"{name}.{k}") for k in dst}
    if isinstance(dst, torch.Tensor):
        local = dst.to_local() if isinstance(dst, DTensor) else dst
        if local.shape != src.shape:
            raise RuntimeError(f"D-CHAG state {name} has shape {tuple(src.shape)} but the model "
                               f"needs {tuple(local.shape)}; resume with the same parallel layout")
        local.copy_(src)
        return dst
    return src


def _load_private(path: Path, template: dict, model_sd: dict, optim_sd: dict) -> None:
    """Put this rank's saved D-CHAG entries back into the loaded state dicts."""
    file = path / "dchag" / f"rank{_rank()}.pt"
    saved = torch.load(file, map_location="cpu", weights_only=False) if file.is_file() else None
    if saved is None or saved["world"] != template["world"]:
        found = "none" if saved is None else f"one written by {saved['world']} processes"
        raise RuntimeError(
            f"the resumable state {path} has no D-CHAG weights for rank {_rank()} of "
            f"{template['world']} ({found}); D-CHAG weights are per rank, so resume with the "
            "parallel layout that wrote it, or set train.resume: false")
    for part, target in (("model", model_sd), ("optim", optim_sd.get("state", {}))):
        if saved[part].keys() != template[part].keys():
            raise RuntimeError(f"the D-CHAG {part} state in {file} does not match this model "
                               "(another variant or layout); resume with the same parallel "
                               "layout, or set train.resume: false")
        for key, value in template[part].items():
            target[key] = _copy_into(value, saved[part][key], key)
    for group, own in zip(optim_sd.get("param_groups", []), template["groups"], strict=True):
        group["params"] = own


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
