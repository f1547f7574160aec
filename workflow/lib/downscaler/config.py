"""Load and validate the workflow configuration against workflow/schemas/config.schema.yaml.

Fills every default from the schema, then checks what a schema cannot (dates in order, splits
inside the period, tiles that fit the model). Any problem is one `ConfigError` naming the key and
the fix, raised before any rule runs.
"""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and what to do."""


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    return yaml.safe_load(path.read_text())


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Return a copy of `config` with defaults filled in; raise ConfigError if it is invalid."""
    schema = schema or load_schema()
    config = copy.deepcopy(config)
    _fill_defaults(config, schema, schema)
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_describe(errors[0], schema))
    _check_semantics(config)
    return config


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
    __import__("downscaler.parallel.layout", fromlist=["check_config"]).check_config(config)


def _check_sources(config: dict) -> None:
    if config["source"] == "local" and not config["local"]["paths"]:
        raise ConfigError("config key local.paths: source local needs files or glob patterns")
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
    """Fine grid size (lat, lon) implied by region and resolution."""
    region, res = config["region"], config["resolution"]
    shape = []
    for lo, hi in ((region["south"], region["north"]), (region["west"], region["east"])):
        cells = (hi - lo) / res
        if abs(cells - round(cells)) > 1e-6:
            raise ConfigError(
                f"config key region: extent {hi - lo} deg is not a multiple of resolution {res}"
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
    model = {**PRESETS[config["model"]["preset"]], **config["model"]}
    tiles = config["tiles"]
    try:
        check_tiling(coarse, tiles["div_lat"], tiles["div_lon"], tiles["halo"],
                     model["patch_size"])
    except ValueError as err:
        raise ConfigError(f"config key tiles (coarse grid {coarse[0]}x{coarse[1]}): {err}") from err
    if model["embed_dim"] % model["num_heads"]:
        raise ConfigError(
            f"config key model: embed_dim {model['embed_dim']} is not divisible by "
            f"num_heads {model['num_heads']}"
        )
