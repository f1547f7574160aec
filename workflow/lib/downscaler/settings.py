"""The whole configuration as typed, frozen objects, built once from the validated config.

The defaults live in one place, the schema (``workflow/schemas/config.schema.yaml``):
``config.validate_config`` fills them, and ``Settings.from_validated`` (or ``typed`` for one
section of a rule's config slice) only converts, supplying no default of its own: a missing key
is an error that names it and says to validate first. Keys the schema leaves without a default
(optional model overrides, parts of an inference input) are marked ``OPTIONAL`` and are None
when absent. The ``train`` and ``parallel`` sections are ``train_config``'s classes.

Library functions that tests and benchmarks also call with a hand-written mapping complete it
from the schema with ``from_schema``, so even there no default is written twice.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from downscaler.config import SCHEMA_PATH, ConfigError, _fill_defaults, _resolve, load_schema
from downscaler.train_config import ParallelConfig, TrainConfig
from downscaler.train_config import from_validated as _train_sections

# A schema key without a default: None when the config does not give it.
OPTIONAL = {"optional": True}


def _optional() -> Any:
    return field(metadata=OPTIONAL)


@dataclass(frozen=True, kw_only=True)
class DateRange:
    """Inclusive dates, YYYY-MM-DD."""

    start: str
    end: str


@dataclass(frozen=True, kw_only=True)
class Region:
    """Cell edges in degrees, longitudes -180..180."""

    south: float
    north: float
    west: float
    east: float


@dataclass(frozen=True, kw_only=True)
class Split:
    """``split``: the train / val / test periods, disjoint and inside ``period``."""

    train: DateRange
    val: DateRange
    test: DateRange


@dataclass(frozen=True, kw_only=True)
class TargetsConfig:
    """``targets``: the fine-grid data the model learns to produce (source, variables, grid
    spacing, files); ``inputs`` has the same keys and one more."""

    source: str
    variables: tuple[str, ...]
    resolution: float
    paths: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class InputsConfig(TargetsConfig):
    """``inputs``: the coarse data the model is given, and whether calendar features join."""

    calendar: bool


@dataclass(frozen=True, kw_only=True)
class Era5Config:
    """``era5``: CDS download settings shared by every era5 source."""

    raw_dir: str
    max_parallel_requests: int
    max_fields_per_request: int
    retries: int
    retry_wait_s: float
    data_format: str


@dataclass(frozen=True, kw_only=True)
class InferenceInput:
    """One ``inference_inputs`` entry: other coarse data to downscale."""

    source: str
    provider: str
    member: str
    table: str
    root: str | None = _optional()
    source_id: str | None = _optional()
    experiment: str | None = _optional()
    paths: tuple[str, ...] | None = _optional()
    period: DateRange | None = _optional()


@dataclass(frozen=True, kw_only=True)
class RegridConfig:
    """``regrid``: the coarse grid and how inputs are put on it."""

    factor: int
    backend: str
    time_chunk: int
    nan_threshold: float
    scheduler: str


@dataclass(frozen=True, kw_only=True)
class TilesConfig:
    """``tiles``: the TILES layout on the coarse grid and the tile writer's memory."""

    div_lat: int
    div_lon: int
    halo: int
    pad_mode: str
    memory_mb: float


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """``model``: a preset and optional overrides of its sizes."""

    preset: str
    architecture: str
    embed_dim: int | None = _optional()
    depth: int | None = _optional()
    num_heads: int | None = _optional()
    patch_size: int | None = _optional()
    decoder_depth: int | None = _optional()
    residual_channels: int | None = _optional()
    dropout: float | None = _optional()


@dataclass(frozen=True, kw_only=True)
class EnsembleConfig:
    """``infer.ensemble``: MC-dropout draws and further checkpoints (both off: deterministic)."""

    mc_dropout: int
    checkpoints: tuple[str, ...]
    seed: int

    @property
    def active(self) -> bool:
        return bool(self.mc_dropout or self.checkpoints)


@dataclass(frozen=True, kw_only=True)
class InferConfig:
    """``infer``: downscaling in batches of tiles and chunks of time."""

    batch_size: int
    blend: bool
    time_chunk: int
    format: str
    processes: int
    ensemble: EnsembleConfig


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """``evaluate``: baselines, streaming chunk, figures and the seam check."""

    baselines: tuple[str, ...]
    time_chunk: int
    map_time: int
    upsample_vit_checkpoint: str
    benchmarks: str
    seams: SeamsConfig


@dataclass(frozen=True, kw_only=True)
class SeamsConfig:
    """``evaluate.seams``: the TILES seam check on the test period (also on the whole domain
    as one tile, for reference; over ``max_steps`` time steps, 0 = all)."""

    whole_domain: bool
    max_steps: int


@dataclass(frozen=True, kw_only=True)
class BenchmarksConfig:
    """``benchmarks``: each size's scripts and their options (free-form, as the rules pass
    them on the command line)."""

    demo: dict[str, Any]
    paper: dict[str, Any]
    dchag_variants: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every section of a validated config, typed."""

    seed: int
    targets: TargetsConfig
    inputs: InputsConfig
    static_paths: tuple[str, ...]
    coverage: str
    era5: Era5Config
    inference_inputs: dict[str, InferenceInput]
    variables: tuple[str, ...]
    statics: tuple[str, ...]
    region: Region
    period: DateRange
    frequency: str
    split: Split
    regrid: RegridConfig
    tiles: TilesConfig
    model: ModelSection
    train: TrainConfig
    parallel: ParallelConfig
    infer: InferConfig
    evaluate: EvaluateConfig
    benchmarks: BenchmarksConfig

    @classmethod
    def from_validated(cls, config: Mapping[str, Any]) -> Settings:
        """The typed config of one filled by ``config.validate_config`` (no default added)."""
        train, parallel = _train_sections(config)
        return build(cls, {**config, "train": train, "parallel": parallel}, "")


def build(cls: type, section: Any, name: str) -> Any:
    """``cls`` from the mapping ``section`` (config key ``name``, "" for the whole config);
    nested sections too."""
    if isinstance(section, cls):
        return section
    if not isinstance(section, Mapping):
        raise ConfigError(f"config key {name}: expected a mapping, got {section!r}")
    prefix = f"{name}." if name else ""
    hints = typing.get_type_hints(cls)
    own = fields(cls)
    optional = {f.name for f in own if f.metadata.get("optional")}
    missing = [f.name for f in own if f.name not in section and f.name not in optional]
    unknown = sorted(set(section) - {f.name for f in own})
    if missing or unknown:
        raise ConfigError(
            f"config keys missing: {[prefix + k for k in missing]}, unknown: "
            f"{[prefix + k for k in unknown]}; pass the config through "
            "downscaler.config.validate_config first (it fills the schema's defaults)")
    return cls(**{f.name: _convert(hints[f.name], section.get(f.name), prefix + f.name)
                  for f in own})


def _convert(hint: Any, value: Any, name: str) -> Any:
    """A config value as the type ``hint`` says: sections built, lists made tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, name)
    if origin is tuple:
        return tuple(value)
    if origin is dict and dataclasses.is_dataclass(args[1]):
        return {k: build(args[1], v, f"{name}.{k}") for k, v in value.items()}
    return value


# The sections a rule's config slice may hold, by config key.
SECTIONS: dict[str, type] = {
    "targets": TargetsConfig, "inputs": InputsConfig, "era5": Era5Config, "region": Region,
    "period": DateRange, "split": Split, "regrid": RegridConfig, "tiles": TilesConfig,
    "model": ModelSection, "infer": InferConfig, "infer.ensemble": EnsembleConfig,
    "evaluate": EvaluateConfig, "evaluate.seams": SeamsConfig, "benchmarks": BenchmarksConfig,
    "train": TrainConfig, "parallel": ParallelConfig,
}


def typed(config: Mapping[str, Any], key: str) -> Any:
    """Section ``key`` (e.g. ``"tiles"``) of a validated config or of a rule's slice of one."""
    return build(SECTIONS[key], config[key], key)


def from_schema(key: str, given: Any) -> Any:
    """Section ``key`` from a partial mapping (tests, benchmarks, hand-written calls), its
    other keys filled from the schema's defaults; a section already typed is returned as is."""
    cls = SECTIONS[key]
    if isinstance(given, cls):
        return given
    root = _schema()
    schema = root
    for part in key.split("."):
        schema = schema["properties"][part]
        if "$ref" in schema:
            schema = _resolve(schema["$ref"], root)
    node = copy.deepcopy(dict(given))
    _fill_defaults(node, schema, root)
    return build(cls, node, key)


@functools.cache
def schema_defaults(key: str) -> Any:
    """Section ``key`` as the schema's defaults alone: the keyword defaults of library functions
    (``make_pairs``, ``downscale_chunks``, ...) read it, so they cannot drift from the schema."""
    return from_schema(key, {})


@functools.cache
def _schema() -> dict:
    return load_schema(SCHEMA_PATH)


def as_dict(obj: Any) -> dict:
    """Back to plain data (JSON, provenance), tuples as lists."""
    return _plain(dataclasses.asdict(obj))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
