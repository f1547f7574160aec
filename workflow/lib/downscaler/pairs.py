"""Training pairs: fine targets and their conservatively coarsened inputs, splits, normalisation.

The fine grid is cropped to a multiple of the factor k and coarsened conservatively, so coarse
cell (i, j) is exactly fine block [k*i, k*i+k) x [k*j, k*j+k). Statistics come from the train
period only and are applied identically at inference:
  zscore:  z = (x - mean) / std
  log1p:   z = (log1p(x') - mean) / std with x' = 0 where x <= 0.25 mm/day (ORBIT-2), so drizzle
           does not dominate the log-space variance. The inverse clips at 0.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from downscaler.compute import compute, dask_scheduler, store_netcdf
from downscaler.io import atomic_path, write_json
from downscaler.regrid import coarsen_conservative, crop_to_multiple, normalise_grid
from downscaler.variables import BY_SHORT_NAME

PRECIP_THRESHOLD = 0.25  # mm/day; at or below counts as dry before the log transform


def add_latitude_static(static: xr.Dataset) -> xr.Dataset:
    """Latitude as a static field, so the model can learn latitude-dependent corrections."""
    lat = static["lat"].broadcast_like(static["lon"]).astype("float32").transpose("lat", "lon")
    meta = BY_SHORT_NAME["latitude"]
    return static.assign(
        latitude=lat.assign_attrs(units=meta.units, standard_name=meta.standard_name)
    )


def make_pairs(
    fields: xr.Dataset,
    static: xr.Dataset,
    factor: int,
    backend: str = "auto",
    nan_threshold: float = 0.5,
) -> tuple[xr.Dataset, xr.Dataset]:
    """Return (fine, coarse): fields + statics on the cropped fine grid and on the k-coarse grid.

    Lazy when `fields` is dask-backed (nothing is computed here). A coarse cell whose fine block
    has less than `nan_threshold` valid area is NaN (land-only data), never filled.
    """
    try:
        merged = xr.merge([normalise_grid(fields), add_latitude_static(normalise_grid(static))],
                          join="exact")
    except ValueError as err:
        raise ValueError(f"the fields and the static fields must share one lat/lon grid: {err}. "
                         "Regrid the statics onto the fields' grid first") from err
    fine = crop_to_multiple(merged, factor)
    coarse = coarsen_conservative(fine, factor, backend=backend, nan_threshold=nan_threshold)
    return fine, coarse


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
    regrid_cfg: dict,
    split: dict,
    names: list[str],
    fine_path: str,
    coarse_path: str,
    stats_path: str,
) -> dict[str, dict]:
    """The pairs stage: write fine.nc, coarse.nc and the train statistics, and return them.

    `fields` should be dask-backed, chunked by time (open with chunks={"time": n}): then each
    output is streamed chunk by chunk on the scheduler `regrid_cfg["scheduler"]`, holding a
    few time chunks at a time, never a whole variable. Three passes (fine copy, coarse,
    statistics) rather than one shared graph: computing `to_netcdf(compute=False)` delayeds
    together made dask's threaded scheduler hold the whole input (1.7 GB peak for a 1.2 GB
    input, measured), while each `to_netcdf` on its own stays at a few chunks (~0.3 GB).
    Files appear under their final names only when complete.
    """
    fine, coarse = make_pairs(fields, static, regrid_cfg["factor"],
                              regrid_cfg.get("backend", "auto"),
                              regrid_cfg.get("nan_threshold", 0.5))
    train = split_by_time(fine, split)["train"]  # also checks that every split selects data
    lazy = lazy_stats(train, names)
    reductions = [r for _, mean, std in lazy.values() for r in (mean, std)]
    with dask_scheduler(regrid_cfg.get("scheduler", "threads")):
        for ds, path in ((fine, fine_path), (coarse, coarse_path)):
            with atomic_path(path) as tmp:
                store_netcdf(ds, tmp)
        stats = finish_stats(lazy, list(compute(*reductions)))
    write_json(stats, stats_path)
    return stats
