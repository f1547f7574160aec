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

from downscaler.regrid import coarsen_conservative, crop_to_multiple
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
    fields: xr.Dataset, static: xr.Dataset, factor: int, backend: str = "auto"
) -> tuple[xr.Dataset, xr.Dataset]:
    """Return (fine, coarse): fields + statics on the cropped fine grid and on the k-coarse grid."""
    fine = crop_to_multiple(xr.merge([fields, add_latitude_static(static)]), factor)
    coarse = coarsen_conservative(fine, factor, backend=backend)
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
        return np.log1p(da.where(da > PRECIP_THRESHOLD, 0.0))
    return da


def compute_stats(train: xr.Dataset, names: list[str]) -> dict[str, dict]:
    """Mean and std of each (transformed) variable over the train split."""
    stats = {}
    for name in names:
        transform = BY_SHORT_NAME[name].transform
        values = _transformed(train[name].astype("float64"), transform)
        mean, std = float(values.mean()), float(values.std())
        stats[name] = {"transform": transform, "mean": mean, "std": std if std > 0 else 1.0}
    return stats


def normalise(da: xr.DataArray | np.ndarray, entry: dict):
    """Physical units -> model space."""
    if entry["transform"] == "log1p":
        da = np.log1p(np.where(da > PRECIP_THRESHOLD, da, 0.0))
    return (da - entry["mean"]) / entry["std"]


def denormalise(z: np.ndarray, entry: dict) -> np.ndarray:
    """Model space -> physical units (precipitation clipped at 0)."""
    x = z * entry["std"] + entry["mean"]
    if entry["transform"] == "log1p":
        x = np.maximum(np.expm1(x), 0.0)
    return x
