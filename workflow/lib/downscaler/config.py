"""Load and validate the workflow configuration against workflow/schemas/config.schema.yaml.

Fills every default from the schema, then checks what a schema cannot (dates in order, splits
inside the period, tiles that fit the model). Any problem is one `ConfigError` naming the key and
the fix, raised before any rule runs.
"""

from __future__ import annotations

import copy
import datetime as dt
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from downscaler.variables import calendar_names, short_names, variable

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and what to do."""


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    return yaml.safe_load(path.read_text())


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Return a copy of `config` with defaults filled in; raise ConfigError if it is invalid."""
    schema = schema or load_schema()
    config = copy.deepcopy(config)
    _check_old_keys(config)
    # only weights the user wrote are checked: the schema default names the demo's variables
    given_weights = dict((config.get("train") or {}).get("variable_weights") or {})
    _fill_defaults(config, schema, schema)
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_describe(errors[0], schema))
    _check_semantics(config)
    _check_weights(config, given_weights)
    _derive(config)
    _check_layout(config)
    _check_typed(config)
    return config


def stage_names(config: dict) -> dict[str, list[str]]:
    """Short names of the model inputs (calendar features included), targets and statics."""
    calendar = calendar_names(config["frequency"]) if config["inputs"]["calendar"] else []
    return {"inputs": short_names(config["inputs"]["variables"]) + calendar,
            "targets": short_names(config["targets"]["variables"]),
            "statics": short_names(config["statics"]), "calendar": calendar}


def _check_layout(config: dict) -> None:
    """The parallel layout against the process count and the model (one message, at config
    time); imported here because the layout module needs ConfigError from this one."""
    from downscaler.parallel.layout import check_config

    check_config(config)


def _check_typed(config: dict) -> None:
    """The typed view must build: a schema key without its dataclass field in settings.py or
    train_config.py (or the reverse) fails here, at config time, not in a stage."""
    from downscaler.settings import Settings

    Settings.from_validated(config)


# Flat keys of the single-dataset configuration, replaced by the `targets` / `inputs` blocks.
OLD_KEYS = {
    "source": "targets.source",
    "variables": "targets.variables",
    "resolution": "targets.resolution",
    "local": "targets.paths and static_paths",
}


def _check_old_keys(config: dict) -> None:
    """Translate the flat keys of the old single-dataset config (the coarsened-targets mode),
    with a warning naming the new keys; mixing them with the new blocks is an error."""
    targets = config.get("targets") or {}
    levels = sorted({"pressure_levels", "pressure_level_variables"} & set(config.get("era5") or {}))
    if levels:
        raise ConfigError(
            f"config keys era5.{' / era5.'.join(levels)} are no longer used: name each "
            "pressure-level variable in inputs.variables (or targets.variables) as name@hPa, "
            "e.g. [temperature@850, geopotential@500]"
        )
    old = [k for k in OLD_KEYS if k in config]
    if "variables" in old and config["variables"] == targets.get("variables"):
        old.remove("variables")  # the derived key of an already validated config
    if not old:
        return
    moves = "; ".join(f"{k} -> {OLD_KEYS[k]}" for k in old)
    if "targets" in config or "inputs" in config:
        raise ConfigError(
            f"config keys {old} are the old flat form and cannot be mixed with targets/inputs: "
            f"move them ({moves}); e.g. targets: {{source: local, variables: [2m_temperature], "
            "resolution: 0.25, paths: [...]}, inputs: {source: coarsened} "
            "(README, 'Bring your own data')"
        )
    warnings.warn(f"config keys {old} are deprecated: use {moves}, with inputs: {{source: "
                  "coarsened} for the same behaviour (README, 'Bring your own data')",
                  FutureWarning, stacklevel=3)
    new = {}
    for key, name in (("source", "source"), ("variables", "variables"),
                      ("resolution", "resolution")):
        if key in config:
            new[name] = config.pop(key)
    local = config.pop("local", None) or {}
    if local.get("paths"):
        new["paths"] = local["paths"]
    if local.get("static_paths"):
        config["static_paths"] = local["static_paths"]
    config["targets"] = new
    config["inputs"] = {"source": "coarsened"}


def _derive(config: dict) -> None:
    """Keys filled from others: the rules read `variables` (the targets) and inputs.variables."""
    config["variables"] = list(config["targets"]["variables"])
    if not config["inputs"]["variables"]:
        config["inputs"]["variables"] = list(config["targets"]["variables"])
    if not config["inputs"]["resolution"]:
        coarse = config["targets"]["resolution"] * config["regrid"]["factor"]
        config["inputs"]["resolution"] = coarse


def _fill_defaults(node: Any, schema: dict, root: dict) -> None:
    """Recursively set schema defaults for absent keys (objects first, then their members)."""
    if "$ref" in schema:
        schema = _resolve(schema["$ref"], root)
    if not isinstance(node, dict):
        return
    properties = schema.get("properties", {})
    for key, sub in properties.items():
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        if key in node:
            _fill_defaults(node[key], sub, root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):  # named entries, e.g. inference_inputs.<name>
        for key in node.keys() - properties.keys():
            _fill_defaults(node[key], extra, root)


def _resolve(ref: str, root: dict) -> dict:
    node = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _describe(error: jsonschema.ValidationError, schema: dict) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return f"config key {key}: unknown key(s) {extra}; valid keys: {allowed}"
    if error.validator == "enum":
        return f"config key {key}: {error.instance!r} is not one of {error.validator_value}"
    description = error.schema.get("description", "")
    hint = f" ({description.strip()})" if description else ""
    return f"config key {key}: {error.message}{hint}"


def _date(value: str, key: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError as err:
        raise ConfigError(f"config key {key}: {value!r} is not a date (YYYY-MM-DD)") from err


def _check_semantics(config: dict) -> None:
    region = config["region"]
    if region["south"] >= region["north"]:
        raise ConfigError("config key region: south must be less than north")
    if region["west"] >= region["east"]:
        raise ConfigError("config key region: west must be less than east (longitudes -180..180)")
    start = _date(config["period"]["start"], "period.start")
    end = _date(config["period"]["end"], "period.end")
    if end < start:
        raise ConfigError(f"config key period: end {end} is before start {start}")
    ranges = {}
    for name, span in config["split"].items():
        first = _date(span["start"], f"split.{name}.start")
        last = _date(span["end"], f"split.{name}.end")
        if last < first:
            raise ConfigError(f"config key split.{name}: end {last} is before start {first}")
        if first < start or last > end:
            raise ConfigError(
                f"config key split.{name}: {first}..{last} is not inside period {start}..{end}"
            )
        ranges[name] = (first, last)
    ordered = sorted(ranges.items(), key=lambda item: item[1][0])
    for (a, (_, a_end)), (b, (b_start, _)) in zip(ordered, ordered[1:], strict=False):
        if b_start <= a_end:
            raise ConfigError(f"config key split: {a} and {b} overlap; splits must be disjoint")
    _check_sources(config)
    _check_grid(config)


def _check_variables(config: dict) -> None:
    for part in ("targets", "inputs"):
        for i, name in enumerate(config[part]["variables"]):
            try:
                variable(name)
            except KeyError as err:
                raise ConfigError(f"config key {part}.variables.{i}: {err.args[0]}") from None
    inputs, targets = config["inputs"], config["targets"]
    if inputs["source"] == "coarsened":
        extra = [v for v in inputs["variables"] if v not in targets["variables"]]
        if extra:
            raise ConfigError(
                f"config key inputs.variables: {extra} are not target variables, so source "
                "coarsened cannot make them; add them to targets.variables or choose another "
                "inputs.source (synthetic, era5, local)"
            )


def _check_weights(config: dict, weights: dict) -> None:
    """A weight for a name that is not a target would silently weigh nothing (a typo)."""
    outputs = config["targets"]["variables"]
    unknown = sorted(set(weights) - set(outputs))
    if unknown:
        raise ConfigError(
            f"config key train.variable_weights: {unknown} are not target variables; valid "
            f"names: {sorted(outputs)}"
        )


def _check_sources(config: dict) -> None:
    _check_variables(config)
    for part in ("targets", "inputs"):
        if config[part]["source"] == "local" and not config[part]["paths"]:
            raise ConfigError(f"config key {part}.paths: source local needs files or glob "
                              "patterns")
    given = config["inputs"]["resolution"]
    if config["inputs"]["source"] != "coarsened" and given and given < config["targets"][
            "resolution"]:
        raise ConfigError(
            f"config key inputs.resolution: {given:g} deg is finer than targets.resolution "
            f"{config['targets']['resolution']:g}; there is nothing to downscale. Inputs must be "
            "coarser than the targets (the model's coarse grid is targets.resolution x "
            "regrid.factor)"
        )
    if config["inputs"]["source"] == "synthetic" and config["targets"]["source"] != "synthetic":
        raise ConfigError("config key inputs.source: synthetic inputs come from the synthetic "
                          "world of the targets; set targets.source: synthetic too")
    needs = {"cmip6": {"local": ["root", "source_id", "experiment"],
                       "esgf": ["source_id", "experiment"],
                       "cds": ["source_id", "experiment"]},
             "local": {"local": ["paths"], "esgf": ["paths"], "cds": ["paths"]}}
    for name, spec in config["inference_inputs"].items():
        if not name.isidentifier():
            raise ConfigError(f"config key inference_inputs.{name}: use letters, digits and _")
        missing = [k for k in needs[spec["source"]][spec["provider"]] if not spec.get(k)]
        if missing:
            raise ConfigError(f"config key inference_inputs.{name}: {spec['source']} input "
                              f"needs {missing}")


def grid_shape(config: dict) -> tuple[int, int]:
    """Fine grid size (lat, lon) implied by region and targets.resolution."""
    region, res = config["region"], config["targets"]["resolution"]
    shape = []
    for lo, hi in ((region["south"], region["north"]), (region["west"], region["east"])):
        cells = (hi - lo) / res
        if abs(cells - round(cells)) > 1e-6:
            raise ConfigError(
                f"config key region: extent {hi - lo} deg is not a multiple of "
                f"targets.resolution {res}"
            )
        shape.append(round(cells))
    return shape[0], shape[1]


def _check_grid(config: dict) -> None:
    from downscaler.model.presets import PRESETS
    from downscaler.tiling import check_tiling

    factor = config["regrid"]["factor"]
    fine = grid_shape(config)
    coarse = (fine[0] // factor, fine[1] // factor)
    if min(coarse) < 1:
        raise ConfigError(f"config key regrid.factor: {factor} is larger than the grid {fine}")
    _check_factor_divides(config, fine, factor)
    model = {**PRESETS[config["model"]["preset"]], **config["model"]}
    tiles = config["tiles"]
    try:
        check_tiling(coarse, tiles["div_lat"], tiles["div_lon"], tiles["halo"],
                     model["patch_size"])
    except ValueError as err:
        raise ConfigError(f"config key tiles (coarse grid {coarse[0]}x{coarse[1]}): {err}") from err
    _check_halo(coarse, tiles)
    if model["embed_dim"] % model["num_heads"]:
        raise ConfigError(
            f"config key model: embed_dim {model['embed_dim']} is not divisible by "
            f"num_heads {model['num_heads']}"
        )


def _check_factor_divides(config: dict, fine: tuple[int, int], factor: int) -> None:
    """k must divide the fine grid: a remainder would be cropped, shrinking the region."""
    if fine[0] % factor == 0 and fine[1] % factor == 0:
        return
    region, res = config["region"], config["targets"]["resolution"]
    factors = [k for k in range(2, min(fine) + 1) if fine[0] % k == 0 and fine[1] % k == 0]
    nearest = sorted(factors, key=lambda k: (abs(k - factor), k))[:3]
    north = region["south"] + (fine[0] // factor) * factor * res
    east = region["west"] + (fine[1] // factor) * factor * res
    north_up = region["south"] + -(-fine[0] // factor) * factor * res
    east_up = region["west"] + -(-fine[1] // factor) * factor * res
    raise ConfigError(
        f"config key regrid.factor: {factor} does not divide the {fine[0]}x{fine[1]} target "
        f"grid (region {region}, targets.resolution {res}); the coarse grid would drop cells. "
        f"Choose regrid.factor in {sorted(nearest)}, or a region whose extent is a multiple of "
        f"{factor * res:g} deg, e.g. north {north:g} or {north_up:g}, east {east:g} or {east_up:g}"
    )


def halo_cost(tile_shape: tuple[int, int], halo: int) -> float:
    """Tokens (pixels) per tile with the halo over without it: the extra compute a halo costs."""
    h, w = tile_shape
    return (h + 2 * halo) * (w + 2 * halo) / (h * w)


def _check_halo(coarse: tuple[int, int], tiles: dict) -> None:
    """A halo wider than the tile itself costs more than it helps: refuse it, naming the cost."""
    h, w = coarse[0] // tiles["div_lat"], coarse[1] // tiles["div_lon"]
    halo = tiles["halo"]
    if halo > min(h, w):
        raise ConfigError(
            f"config key tiles.halo: {halo} coarse pixels is wider than the {h}x{w} tiles; each "
            f"tile would carry {halo_cost((h, w), halo):.1f}x the tokens of its core (halo "
            f"{min(h, w)} costs {halo_cost((h, w), min(h, w)):.1f}x). Use a halo of at most "
            f"{min(h, w)} (ORBIT-2 uses a few pixels), or fewer tiles (smaller div_lat/div_lon)"
        )
