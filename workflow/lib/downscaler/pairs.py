"""Training pairs: fine targets and their conservatively coarsened inputs, splits, normalisation.

The fine grid is cropped to a multiple of the factor k and coarsened conservatively, so coarse
cell (i, j) is exactly fine block [k*i, k*i+k) x [k*j, k*j+k). Statistics come from the train
period only and are applied identically at inference:
  zscore:  z = (x - mean) / std
  log1p:   z = (log1p(x') - mean) / std with x' = 0 where x <= 0.25 mm/day (ORBIT-2), so drizzle
           does not dominate the log-space variance. The inverse clips at 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import xarray as xr

from downscaler.compute import compute, dask_scheduler, store_netcdf
from downscaler.io import atomic_path, write_json
from downscaler.regrid import coarsen_conservative, normalise_grid, regrid
from downscaler.settings import RegridConfig, from_schema, schema_defaults
from downscaler.variables import BY_SHORT_NAME

PRECIP_THRESHOLD = 0.25  # mm/day; at or below counts as dry before the log transform
DAYS_PER_YEAR = 365.2425


def add_latitude_static(static: xr.Dataset) -> xr.Dataset:
    """Latitude as a static field, so the model can learn latitude-dependent corrections."""
    lat = static["lat"].broadcast_like(static["lon"]).astype("float32").transpose("lat", "lon")
    meta = BY_SHORT_NAME["latitude"]
    return static.assign(
        latitude=lat.assign_attrs(units=meta.units, standard_name=meta.standard_name)
    )


def calendar_features(times: np.ndarray, names: list[str], grid: xr.Dataset) -> xr.Dataset:
    """sin/cos of the hour of day and of the day of year, the same in every cell of `grid`."""
    index = pd.DatetimeIndex(times)
    hour = 2 * np.pi * (index.hour + index.minute / 60.0) / 24.0
    day = 2 * np.pi * (index.day_of_year - 1 + index.hour / 24.0) / DAYS_PER_YEAR
    values = {"hour_sin": np.sin(hour), "hour_cos": np.cos(hour),
              "doy_sin": np.sin(day), "doy_cos": np.cos(day)}
    ones = xr.ones_like(grid["lat"] * grid["lon"], dtype="float32").transpose("lat", "lon")
    out = {}
    for name in names:
        series = xr.DataArray(np.asarray(values[name], dtype="float32"), dims="time",
                              coords={"time": times})
        out[name] = (series * ones).assign_attrs(units="1", long_name=name.replace("_", " "))
    return xr.Dataset(out)


def check_factor(ds: xr.Dataset, factor: int) -> None:
    """The fine grid must be exact k x k blocks: a remainder would be cropped silently."""
    if ds.sizes["lat"] % factor or ds.sizes["lon"] % factor:
        raise ValueError(
            f"config key regrid.factor: {factor} does not divide the "
            f"{ds.sizes['lat']}x{ds.sizes['lon']} target grid; choose a factor that divides "
            "both sizes, or a region whose extent is a multiple of factor x targets.resolution"
        )


def make_pairs(
    fields: xr.Dataset,
    static: xr.Dataset,
    factor: int,
    backend: str = schema_defaults("regrid").backend,
    nan_threshold: float = schema_defaults("regrid").nan_threshold,
    inputs: xr.Dataset | None = None,
    input_names: list[str] | None = None,
    calendar: list[str] | None = None,
    latitude: bool = True,
) -> tuple[xr.Dataset, xr.Dataset]:
    """Return (fine, coarse): targets + statics on the fine grid, inputs + statics coarse.

    The coarse grid is the fine grid in exact k x k blocks. Inputs are the targets coarsened
    (`inputs` None: the "perfect model" setting) or `inputs` regridded conservatively onto the
    coarse grid from their own grid, at the targets' time steps. `input_names` (short names)
    picks the inputs kept in `coarse` (default: every variable); `calendar` adds calendar
    features. Lazy when the data are dask-backed. A coarse cell whose fine block has less than
    `nan_threshold` valid area is NaN (land-only data), never filled.
    """
    if "lat" not in static.dims:  # no statics at all: an empty dataset on the fields' grid
        static = xr.Dataset(coords={"lat": fields["lat"], "lon": fields["lon"]})
    statics = normalise_grid(static)
    if latitude:
        statics = add_latitude_static(statics)
    try:
        fine = xr.merge([normalise_grid(fields), statics], join="exact")
    except ValueError as err:
        raise ValueError(f"the fields and the static fields must share one lat/lon grid: {err}. "
                         "Regrid the statics onto the fields' grid first") from err
    check_factor(fine, factor)
    coarse_all = coarsen_conservative(fine, factor, backend=backend, nan_threshold=nan_threshold)
    coarse_static = coarse_all[list(statics.data_vars)]
    if inputs is None:
        names = input_names or list(fields.data_vars)
        coarse = xr.merge([coarse_all[names], coarse_static])
    else:
        if _same_grid(normalise_grid(inputs), fine):  # inputs on the target grid: exact blocks
            inputs = coarsen_conservative(inputs, factor, backend=backend,
                                          nan_threshold=nan_threshold)
        coarse_inputs = inputs_on_grid(inputs, coarse_all, fine["time"].values, backend,
                                       nan_threshold)
        names = input_names or list(inputs.data_vars)
        coarse = xr.merge([coarse_inputs[names], coarse_static], join="exact")
    if calendar:
        coarse = xr.merge([coarse, calendar_features(fine["time"].values, calendar, coarse)])
    return fine, coarse


def _same_grid(a: xr.Dataset, b: xr.Dataset) -> bool:
    return (a.sizes["lat"] == b.sizes["lat"] and a.sizes["lon"] == b.sizes["lon"]
            and np.allclose(a["lat"], b["lat"]) and np.allclose(a["lon"], b["lon"]))


def inputs_on_grid(inputs: xr.Dataset, grid: xr.Dataset, times: np.ndarray, backend: str,
                   nan_threshold: float) -> xr.Dataset:
    """Inputs from their own grid onto the coarse grid (conservative), at the targets' times."""
    inputs = normalise_grid(inputs)
    missing = pd.DatetimeIndex(times).difference(pd.DatetimeIndex(inputs["time"].values))
    if len(missing):
        raise ValueError(
            f"the inputs lack {len(missing)} time step(s) the targets have (first "
            f"{missing[0]:%Y-%m-%d %H:%M}); give inputs over the same period and frequency"
        )
    inputs = inputs.sel(time=times)
    if _same_grid(inputs, grid):
        return inputs.assign_coords(lat=grid["lat"], lon=grid["lon"])
    out = regrid(inputs, grid[["lat", "lon"]], "conservative", backend=backend,
                 nan_threshold=nan_threshold)
    empty = [n for n in out.data_vars if bool(out[n].isel(time=0).isnull().all())]
    if empty:
        raise ValueError(f"the inputs {empty} do not overlap the coarse grid; give inputs over "
                         "the region")
    return out


def split_by_time(ds: xr.Dataset, split: dict) -> dict[str, xr.Dataset]:
    """Select each split's inclusive date range; an empty selection is an error naming it."""
    parts = {}
    for name, span in split.items():
        part = ds.sel(time=slice(span["start"], f"{span['end']}T23:59:59"))
        if part.sizes["time"] == 0:
            raise ValueError(f"split.{name} ({span['start']}..{span['end']}) selects no time step")
        parts[name] = part
    return parts


def _transformed(da: xr.DataArray, transform: str) -> xr.DataArray:
    if transform == "log1p":
        # `<=` (not `>`) so that NaN (missing data) stays NaN instead of becoming dry
        return np.log1p(da.where(~(da <= PRECIP_THRESHOLD), 0.0))
    return da


def lazy_stats(train: xr.Dataset, names: list[str]) -> dict[str, tuple]:
    """Per variable (transform, mean, std) with mean/std as lazy 0-d reductions.

    Separate from `compute_stats` so a caller can compute them in the same dask pass as other
    outputs (cli.pairs writes the pairs and reduces the statistics from one read of the data).
    NaN (missing data) is skipped. Dask's std merges per-chunk moments (Chan et al.), so the
    result equals the in-memory one without ever holding a whole variable.
    """
    out = {}
    for name in names:
        transform = BY_SHORT_NAME[name].transform
        values = _transformed(train[name], transform)
        # accumulate in float64 without a float64 copy of every chunk (half the memory)
        out[name] = (transform, values.mean(skipna=True, dtype="float64"),
                     values.std(skipna=True, dtype="float64"))
    return out


def finish_stats(lazy: dict[str, tuple], computed: list) -> dict[str, dict]:
    """Assemble the stats dict from `lazy_stats` and the computed [mean, std, mean, std, ...]."""
    stats = {}
    for i, (name, (transform, _, _)) in enumerate(lazy.items()):
        mean, std = float(computed[2 * i]), float(computed[2 * i + 1])
        if not np.isfinite(mean):
            raise ValueError(f"variable {name!r} has no valid value in the train split")
        stats[name] = {"transform": transform, "mean": mean, "std": std if std > 0 else 1.0}
    return stats


def compute_stats(train: xr.Dataset, names: list[str]) -> dict[str, dict]:
    """Mean and std of each (transformed) variable over the train split, in one streaming pass."""
    lazy = lazy_stats(train, names)
    computed = compute(*[r for _, mean, std in lazy.values() for r in (mean, std)])
    return finish_stats(lazy, list(computed))


def normalise(da: xr.DataArray | np.ndarray, entry: dict):
    """Physical units -> model space; NaN (missing data) stays NaN."""
    if entry["transform"] == "log1p":
        da = np.log1p(np.where(da <= PRECIP_THRESHOLD, 0.0, da))
    return (da - entry["mean"]) / entry["std"]


def denormalise(z: np.ndarray, entry: dict) -> np.ndarray:
    """Model space -> physical units (precipitation clipped at 0)."""
    x = z * entry["std"] + entry["mean"]
    if entry["transform"] == "log1p":
        x = np.maximum(np.expm1(x), 0.0)
    return x


def write_pairs(
    fields: xr.Dataset,
    static: xr.Dataset,
    regrid_cfg: RegridConfig | Mapping,
    split: dict,
    names: dict[str, list[str]],
    fine_path: str,
    coarse_path: str,
    stats_path: str,
    inputs: xr.Dataset | None = None,
) -> dict[str, dict]:
    """The pairs stage: write fine.nc, coarse.nc and the train statistics, and return them.

    `names` holds short names: `inputs` (model inputs, in coarse.nc, calendar features
    included), `targets` (model outputs, in fine.nc), `statics` (both files; latitude is
    computed) and `calendar` (the calendar features among the inputs). Statistics come from the
    train split: targets and statics from the fine grid (NaN targets skipped), inputs that are
    not targets from the coarse grid, so a variable that is both an input and a target has one
    normalisation and the model's skip connection stays unbiased. stats.json also lists the
    `inputs`, `targets` and `statics` for the model, inference and evaluation.

    `fields` should be dask-backed, chunked by time (open with chunks={"time": n}): then each
    output is streamed chunk by chunk on the scheduler `regrid_cfg.scheduler`, holding a
    few time chunks at a time, never a whole variable. Separate passes (fine copy, coarse,
    statistics) rather than one shared graph: computing `to_netcdf(compute=False)` delayeds
    together made dask's threaded scheduler hold the whole input (1.7 GB peak for a 1.2 GB
    input, measured), while each `to_netcdf` on its own stays at a few chunks (~0.3 GB).
    Files appear under their final names only when complete.
    """
    regrid_cfg = from_schema("regrid", regrid_cfg)
    statics = [s for s in names["statics"] if s != "latitude"]
    fine, coarse = make_pairs(fields[names["targets"]] if inputs is not None else fields,
                              static[statics], regrid_cfg.factor, regrid_cfg.backend,
                              regrid_cfg.nan_threshold, inputs=inputs,
                              input_names=[n for n in names["inputs"]
                                           if n not in names["calendar"]],
                              calendar=names["calendar"],
                              latitude="latitude" in names["statics"])
    fine = fine[names["targets"] + names["statics"]]
    train = split_by_time(fine, split)["train"]  # also checks that every split selects data
    coarse_train = split_by_time(coarse, split)["train"]
    lazy = lazy_stats(train, names["targets"] + names["statics"])
    lazy.update(lazy_stats(coarse_train, [n for n in names["inputs"] if n not in lazy]))
    reductions = [r for _, mean, std in lazy.values() for r in (mean, std)]
    with dask_scheduler(regrid_cfg.scheduler):
        for ds, path in ((fine, fine_path), (coarse, coarse_path)):
            with atomic_path(path) as tmp:
                store_netcdf(ds, tmp)
        stats = finish_stats(lazy, list(compute(*reductions)))
    write_json({**stats, "inputs": names["inputs"], "targets": names["targets"],
                "statics": names["statics"]}, stats_path)
    return stats
