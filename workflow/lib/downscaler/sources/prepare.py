"""From the configured source to the workflow's raw files, and coarse inputs for inference.

Training data become canonical datasets over the configured region and period: the targets
(`targets`: synthetic | era5 | local) on the fine grid, the requested static fields on the same
grid, and, unless the inputs are the coarsened targets, the inputs (`inputs`) on their own grid.
Every read checks coverage of region and period and the plausibility of the values. Other data
to downscale with a trained model (CMIP6 runs, local files; config `inference_inputs`) are read,
mapped onto the ERA5 names the model was trained on, and regridded onto the model's coarse grid.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from downscaler.settings import InferenceInput, as_dict, build
from downscaler.sources.canonical import check_plausible
from downscaler.variables import (
    BY_SHORT_NAME,
    PRESSURE_LEVEL,
    STATICS,
    pressure_level,
    short_names,
    variable,
)


def crop_region(ds: xr.Dataset, region: dict | None, margin: float = 0.0) -> xr.Dataset:
    """Cells whose centres lie inside the region (edges in degrees, lon -180..180).

    Without a margin the interval is half-open, [south, north) x [west, east): a grid whose
    points sit on the region's edges (ERA5's 0.25 deg points at 30.0 ... 46.0 for region
    30..46) gives exactly (north - south) / resolution rows, as the config promises, and a
    cell-centred grid is unaffected. With a margin (inputs on another grid) both ends count.
    """
    if region is None:
        return ds
    lat, lon = ds["lat"], ds["lon"]
    if margin:
        inside_lat = (lat >= region["south"] - margin) & (lat <= region["north"] + margin)
        inside_lon = (lon >= region["west"] - margin) & (lon <= region["east"] + margin)
    else:
        eps = 1e-9
        inside_lat = (lat >= region["south"] - eps) & (lat < region["north"] - eps)
        inside_lon = (lon >= region["west"] - eps) & (lon < region["east"] - eps)
    out = ds.isel(lat=np.flatnonzero(inside_lat.values), lon=np.flatnonzero(inside_lon.values))
    if out.sizes["lat"] == 0 or out.sizes["lon"] == 0:
        raise ValueError(
            f"config key region {region} selects no grid cell of the data "
            f"(lat {float(lat.min()):.2f}..{float(lat.max()):.2f}, "
            f"lon {float(lon.min()):.2f}..{float(lon.max()):.2f})"
        )
    return out


def check_resolution(ds: xr.Dataset, resolution: float, origin: str, key: str) -> None:
    """The data's grid spacing must be the configured one (`key` names the config key)."""
    for name in ("lat", "lon"):
        if ds.sizes[name] > 1:
            step = float(np.diff(ds[name].values).mean())
            if abs(step - resolution) > 1e-6 * max(1.0, resolution):
                raise ValueError(
                    f"{origin}: grid spacing in {name} is {step:g} deg but config key {key} "
                    f"is {resolution:g}; set {key}: {step:g} (or regrid the files)"
                )


def _spacing(values: np.ndarray) -> float:
    return float(np.abs(np.diff(values)).mean()) if values.size > 1 else 0.0


def expected_times(period: dict, frequency: str) -> pd.DatetimeIndex:
    """Every time step a complete dataset holds over `period` (daily at 00:00, or hourly)."""
    end = pd.Timestamp(period["end"]) + (pd.Timedelta(hours=23) if frequency == "hourly"
                                         else pd.Timedelta(0))
    return pd.date_range(period["start"], end, freq="h" if frequency == "hourly" else "D")


def check_coverage(ds: xr.Dataset, config: dict, origin: str, times: bool = True) -> None:
    """The data must cover `region` (cell edges) and every time step of `period`.

    Partial coverage is an error naming what is missing, or a warning with `coverage: warn`.
    """
    region, problems = config["region"], []
    for dim, lo_key, hi_key in (("lat", "south", "north"), ("lon", "west", "east")):
        values = ds[dim].values.astype("float64")
        half = _spacing(values) / 2
        lo, hi = values.min() - half, values.max() + half
        if dim == "lon" and abs(values.size * 2 * half - 360.0) < 1e-6:
            continue  # a global grid wraps around: it covers every longitude
        tol = 1e-6 + 1e-3 * half
        if lo > region[lo_key] + tol or hi < region[hi_key] - tol:
            problems.append(f"{dim} {lo:g}..{hi:g} does not cover region {lo_key} "
                            f"{region[lo_key]:g} .. {hi_key} {region[hi_key]:g}")
    if times and "time" in ds.dims:
        want = expected_times(config["period"], config["frequency"])
        missing = want.difference(pd.DatetimeIndex(ds["time"].values))
        if len(missing):
            span = f"{config['period']['start']}..{config['period']['end']}"
            problems.append(f"{len(missing)} of {len(want)} time steps of period {span} are "
                            f"missing (first {missing[0]:%Y-%m-%d %H:%M}, last "
                            f"{missing[-1]:%Y-%m-%d %H:%M})")
    if not problems:
        return
    message = f"{origin}: " + "; ".join(problems)
    if config["coverage"] == "warn":
        warnings.warn(message + " (coverage: warn, proceeding with what there is)", stacklevel=2)
        return
    raise ValueError(message + ". Fetch the missing data, shrink region/period to the data, or "
                     "set coverage: warn to proceed on what there is")


def _level_split(variables: list[str]) -> tuple[list[str], dict[str, list[int]]]:
    """(single-level names, {pressure-level name: [hPa, ...]}) of config variable names."""
    single, levels = [], {}
    for name in variables:
        parsed = pressure_level(name)
        if parsed is None:
            single.append(name)
        else:
            levels.setdefault(parsed[0], []).append(parsed[1])
    return single, levels


def select_variables(ds: xr.Dataset, variables: list[str], origin: str) -> xr.Dataset:
    """The requested variables under their short names; `name@hPa` picks one pressure level."""
    out = {}
    for name in variables:
        short = variable(name).short_name
        parsed = pressure_level(name)
        if short in ds:
            out[short] = ds[short]
            continue
        base = PRESSURE_LEVEL[parsed[0]][0] if parsed else None
        if base is not None and base in ds and "level" in ds[base].dims:
            levels = [int(v) for v in ds["level"].values]
            if parsed[1] in levels:
                out[short] = ds[base].sel(level=parsed[1]).drop_vars("level")
                continue
            raise KeyError(f"{origin}: {name} asked for level {parsed[1]} hPa but {base} has "
                           f"levels {levels} hPa; choose one of them")
        have = [f"{n}{list(map(int, ds['level'].values)) if 'level' in ds[n].dims else ''}"
                for n in map(str, ds.data_vars)]
        raise KeyError(f"{origin}: no variable {name!r} (file name {short!r}"
                       f"{f' or {base!r} on levels' if base else ''}); the data hold {have}")
    result = xr.Dataset(out)
    for name in result.data_vars:
        meta = BY_SHORT_NAME[name]
        result[name].attrs = {"units": meta.units, "standard_name": meta.standard_name,
                              "long_name": meta.long_name.replace("_", " ")}
    return result


def _load_source(spec: dict, config: dict, raw_dir: Path, role: str,
                 with_static: bool) -> tuple[xr.Dataset, xr.Dataset, str]:
    """(fields, static, origin) of one `inputs` / `targets` block, on the source's own grid."""
    source, variables = spec["source"], spec["variables"]
    period = config["period"]
    if source == "synthetic":
        from downscaler.sources.synthetic import generate

        single, levels = _level_split(variables)
        if levels:
            raise ValueError(f"config key {role}.variables: the synthetic source has no pressure "
                             f"levels ({sorted(levels)}); choose single-level variables")
        # inputs come from the same world at the target resolution, then regridded coarse
        fields, static = generate(variables, config["region"], config["targets"]["resolution"],
                                  period["start"], period["end"], config["frequency"],
                                  config["seed"])
        return fields, static, f"synthetic {role}"
    if source == "era5":
        from downscaler.sources.cds import fetch
        from downscaler.sources.era5 import STATIC_TARGET, load_era5, plan_era5_requests

        single, levels = _level_split(variables)
        all_levels = sorted({lv for lvs in levels.values() for lv in lvs})
        era5 = {**config["era5"], "grid": spec["resolution"],
                "pressure_level_variables": sorted(levels), "pressure_levels": all_levels}
        era5_config = {**config, "variables": single, "era5": era5}
        requests = plan_era5_requests(era5_config, invariants=with_static)
        raw = Path(raw_dir) if role == "targets" else Path(raw_dir) / role
        paths = fetch(requests, raw, era5_config)
        static_path = raw / STATIC_TARGET
        data_paths = [p for p in paths if p != static_path]
        fields, static = load_era5(data_paths, static_path if with_static else None, era5_config)
        origin = f"ERA5 files under {raw}"
        return select_variables(fields, variables, origin), static, origin
    if source == "local":
        from downscaler.sources.local import open_local

        fields, static = open_local(spec["paths"])  # select_variables picks (and checks) them
        origin = f"local files {spec['paths']} ({role})"
        fields = fields.sel(time=slice(period["start"], f"{period['end']}T23:59:59"))
        return select_variables(fields, variables, origin), static, origin
    raise ValueError(f"config key {role}.source: unknown source {source!r}")


def daily_stamps(fields: xr.Dataset, frequency: str, origin: str) -> xr.Dataset:
    """Daily data stamped at 00:00 of their day (files often stamp 12:00), so inputs and
    targets from different products meet on the same time steps."""
    if frequency != "daily" or "time" not in fields.dims:
        return fields
    days = fields.indexes["time"].floor("D")
    if days.has_duplicates:
        raise ValueError(f"{origin}: several time steps per day, but config key frequency is "
                         "daily; aggregate the files to daily values or set frequency: hourly")
    return fields.assign_coords(time=days)


def load_targets(config: dict, raw_dir: Path) -> tuple[xr.Dataset, xr.Dataset]:
    """Canonical target fields on the fine grid over region and period, and the source's statics.

    The statics returned are only those the config asks for (`statics`), see `load_statics`.
    """
    spec = config["targets"]
    wanted = needed_statics(config)
    from_source = bool(wanted) and not config["static_paths"]
    fields, static, origin = _load_source(spec, config, raw_dir, "targets", from_source)
    fields = daily_stamps(fields, config["frequency"], origin)
    check_coverage(fields, config, origin)
    fields = crop_region(fields, config["region"])
    check_resolution(fields, spec["resolution"], origin, "targets.resolution")
    if fields.sizes["time"] == 0:
        raise ValueError(f"{origin}: no time step inside period {config['period']}")
    check_plausible(fields, origin)
    origin_static = f"the targets' source ({origin})"
    if config["static_paths"]:
        from downscaler.sources.local import open_local

        _, static = open_local(config["static_paths"])
        origin_static = f"static_paths {config['static_paths']}"
    return fields, load_statics(static, wanted, fields, origin_static)


def load_inputs(config: dict, raw_dir: Path) -> xr.Dataset:
    """Canonical input fields on their own grid, over the region (plus a margin) and period."""
    spec = config["inputs"]
    fields, _, origin = _load_source(spec, config, raw_dir, "inputs", False)
    fields = daily_stamps(fields, config["frequency"], origin)
    check_coverage(fields, config, origin)
    spacing = max(_spacing(fields["lat"].values), _spacing(fields["lon"].values))
    fields = crop_region(fields, config["region"], margin=spacing)
    if spec["source"] == "local":
        check_resolution(fields, spec["resolution"], origin, "inputs.resolution")
    check_plausible(fields, origin)
    return fields


def needed_statics(config: dict) -> list[str]:
    """Short names of the statics read from files (latitude is computed, never read)."""
    return [STATICS[s].short_name for s in config["statics"] if s != "latitude"]


STATIC_LOOKED_FOR = {"orog": "orog, z (surface geopotential), orography",
                     "lsm": "lsm, sftlf (land-sea mask)"}


def load_statics(static: xr.Dataset | None, wanted: list[str], grid: xr.Dataset,
                 origin: str) -> xr.Dataset:
    """Exactly the `wanted` statics on `grid`'s lat/lon; one that is missing is an error."""
    coords = {"lat": grid["lat"], "lon": grid["lon"]}
    if not wanted:
        return xr.Dataset(coords=coords)
    static = static if static is not None else xr.Dataset()
    missing = [s for s in wanted if s not in static]
    if missing:
        names = {v.short_name: k for k, v in STATICS.items()}
        raise ValueError(
            f"config key statics: {[names[m] for m in missing]} requested but not found in "
            f"{origin} (looked for {'; '.join(STATIC_LOOKED_FOR[m] for m in missing)}); give "
            "static_paths with it, or remove it from statics"
        )
    static = static[wanted]
    check_plausible(static, origin)
    try:  # the same grid points (or a larger domain on the same grid): taken as they are
        out = static.reindex_like(grid[["lat", "lon"]], method="nearest", tolerance=1e-6)
        if not bool(out.isnull().any().to_array().any()):
            return out
    except (KeyError, ValueError):
        pass
    return _statics_onto(static, grid, origin)


def _statics_onto(static: xr.Dataset, grid: xr.Dataset, origin: str) -> xr.Dataset:
    """Statics on another grid: cropped to the target grid (or a margin), then regridded onto it
    (conservative from a finer grid, bilinear from a coarser one)."""
    from downscaler.regrid import regrid

    res = _spacing(grid["lat"].values)
    bounds = {"south": float(grid["lat"].min()), "north": float(grid["lat"].max()),
              "west": float(grid["lon"].min()), "east": float(grid["lon"].max())}
    static = crop_region(static, bounds, margin=2 * max(res, _spacing(static["lat"].values)))
    method = "conservative" if _spacing(static["lat"].values) <= res else "bilinear"
    out = regrid(static.astype("float64"), grid[["lat", "lon"]], method).astype("float32")
    if bool(out.isnull().any().to_array().any()):
        raise ValueError(f"{origin}: the static fields do not cover the target grid; give "
                         "static files over the whole region")
    return out


CDS_MARGIN_DEG = 5.0  # CMIP6 grids reach ~2.8 deg: fetch a border so bilinear covers the edges


def open_inference_input(spec: InferenceInput | Mapping, config: dict,
                         raw_dir: Path | None = None) -> xr.Dataset:
    """Read one `inference_inputs` entry (typed, or its validated mapping) in canonical form
    (any grid), over its period.

    CMIP6 comes from an ESGF directory tree (`provider: local`), through intake-esgf
    (`esgf`), or from the CDS dataset projections-cmip6 (`cds`, downloaded under `raw_dir`).
    """
    spec = build(InferenceInput, spec, "inference_inputs entry")
    variables = config["inputs"]["variables"]
    period = as_dict(spec.period) if spec.period else None
    if spec.source == "cmip6":
        from downscaler.sources.cmip6 import find_local_cmip6, open_cmip6, search_esgf

        ids = (spec.source_id, spec.experiment, spec.member, spec.table)
        if spec.provider == "local":
            paths = find_local_cmip6(spec.root, *ids, variables)
        elif spec.provider == "esgf":  # intake-esgf downloads into (and finds files in) root
            paths = search_esgf(*ids, variables, cache=spec.root, period=period)
        else:
            paths = _fetch_cmip6_cds(spec, period, config, Path(raw_dir or "resources/raw"))
        ds = open_cmip6(paths, variables, period)
    else:
        from downscaler.sources.local import open_local

        files = list(spec.paths)
        ds, _ = open_local(files)
        if period:
            ds = ds.sel(time=slice(period["start"], f"{period['end']}T23:59:59"))
        ds = select_variables(ds, variables, f"inference input files {files}")
    given = {k: v for k, v in as_dict(spec).items() if v is not None}
    check_plausible(ds, f"inference input {given}")
    return ds[short_names(variables)]


def _fetch_cmip6_cds(spec: InferenceInput, period: dict | None, config: dict,
                    raw_dir: Path) -> list[Path]:
    from downscaler.sources.cmip6 import fetch_cmip6_cds

    region = config.get("region")
    if region is not None:
        region = {"south": max(-90.0, region["south"] - CDS_MARGIN_DEG),
                  "north": min(90.0, region["north"] + CDS_MARGIN_DEG),
                  "west": region["west"] - CDS_MARGIN_DEG,
                  "east": region["east"] + CDS_MARGIN_DEG}
    cds_config = {
        **config, "region": region, "frequency": "daily",
        "period": period or config["period"],
        "cmip6": {"model": spec.source_id, "experiment": spec.experiment,
                  "member": spec.member, "variables": config["inputs"]["variables"]},
    }
    return fetch_cmip6_cds(cds_config, raw_dir)


def to_model_grid(ds: xr.Dataset, coarse_grid: xr.Dataset) -> xr.Dataset:
    """Regrid onto the model's coarse grid: conservative from finer data, bilinear from coarser."""
    from downscaler.regrid import regrid

    def spacing(d: xr.Dataset) -> float:
        return float(np.abs(np.diff(d["lat"].values)).mean())

    margin = 2 * max(spacing(ds), spacing(coarse_grid))
    bounds = {"south": float(coarse_grid["lat"].min()), "north": float(coarse_grid["lat"].max()),
              "west": float(coarse_grid["lon"].min()), "east": float(coarse_grid["lon"].max())}
    ds = crop_region(ds, bounds, margin=margin)
    method = "conservative" if spacing(ds) < spacing(coarse_grid) else "bilinear"
    target = xr.Dataset(coords={"lat": coarse_grid["lat"], "lon": coarse_grid["lon"]})
    out = regrid(ds, target, method)
    if bool(out.isnull().any().to_array().any()):
        raise ValueError("the input does not cover the model's whole coarse grid; "
                         "choose data over the region the model was trained on")
    return out
