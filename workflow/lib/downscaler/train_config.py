"""The ``train`` and ``parallel`` config sections as typed, frozen objects (built once).

The defaults live in one place, the schema (``workflow/schemas/config.schema.yaml``):
``config.validate_config`` fills them, and ``from_validated`` turns the two sections into
``TrainConfig`` / ``ParallelConfig`` without supplying any default of its own (a missing key is an
error that says to validate first). Every training stage reads these objects, never the raw dict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """``config["train"]``: optimisation, length, validation and bookkeeping of a run."""

    epochs: int
    max_steps: int
    max_minutes: float
    batch_size: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_epochs: float
    tv_weight: float
    variable_weights: dict[str, float]
    threads: int
    val_every_steps: int
    patience: int
    min_delta: float
    grad_clip: float
    precision: str
    workers: int
    log_every_steps: int
    checkpoint_every_steps: int
    resume: bool
    init_from: str
    log_dir: str


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """``config["parallel"]``: processes, engine and the layout sizes."""

    processes: int
    device: str
    engine: str
    zero_stage: int
    dp_replicate: int
    dp_shard: int
    tp: int
    sp: int
    dchag: str | None
    sp_mode: str
    activation_checkpointing: bool
    layout: str
    memory_gib: float
    pp: int
    pp_schedule: str
    microbatches: int

    def sizes(self) -> dict[str, Any]:
        """The layout part (``dp_replicate`` may still be 0 = auto)."""
        return {k: getattr(self, k) for k in ("pp", "dp_replicate", "dp_shard", "tp", "sp",
                                              "dchag", "sp_mode")}


def _build(cls: type, section: dict, name: str) -> Any:
    names = {f.name for f in fields(cls)}
    missing = sorted(names - set(section))
    unknown = sorted(set(section) - names)
    if missing or unknown:
        raise ValueError(
            f"config section {name!r} has missing keys {missing} / unknown keys {unknown}; "
            "pass the config through downscaler.config.validate_config first (it fills the "
            "schema's defaults)")
    values = dict(section)
    if cls is TrainConfig:
        values["betas"] = tuple(values["betas"])
    return cls(**values)


def from_validated(config: dict) -> tuple[TrainConfig, ParallelConfig]:
    """The typed ``train`` and ``parallel`` sections of a config filled by ``validate_config``."""
    return (_build(TrainConfig, config["train"], "train"),
            _build(ParallelConfig, config["parallel"], "parallel"))


def as_dict(obj: Any) -> dict:
    """Back to a plain dict (for fingerprints and the checkpoint's record of the config)."""
    return dataclasses.asdict(obj)
