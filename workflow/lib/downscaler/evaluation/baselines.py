"""Interpolation baselines: nearest, bilinear and bicubic upsampling onto the k-fold fine grid.

Any learned downscaler has to beat these. The fine grid is an exact k-fold refinement of the
coarse one (coarse cell (i, j) covers fine cells [k i, k i + k) x [k j, k j + k)), and both are
cell-centred, which is exactly the geometry of `torch.nn.functional.interpolate` with
`align_corners=False`: fine centre m sits at coarse index (m + 0.5) / k - 0.5.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from downscaler.variables import BY_SHORT_NAME

METHODS = ("nearest", "bilinear", "bicubic")

# Variables that cannot be negative (precipitation is log1p-normalised for that reason):
# bicubic overshoot below zero is clipped for them.
NONNEGATIVE = frozenset(v.short_name for v in BY_SHORT_NAME.values() if v.transform == "log1p")

# Coarse cells of periodic padding on a global grid: bicubic reads 2 neighbours each side.
_WRAP = 2


def fine_coords(coarse: np.ndarray, factor: int) -> np.ndarray:
    """Centres of the k-fold refinement of a regular cell-centred 1-D coordinate."""
    coarse = np.asarray(coarse, dtype=np.float64)
    if coarse.size < 2:
        raise ValueError(
            "cannot derive the fine grid from a coordinate with fewer than 2 points; "
            "pass fine_lat / fine_lon explicitly"
        )
    step = float(np.diff(coarse).mean())
    offsets = (np.arange(factor) + 0.5) / factor - 0.5  # fine centres within one coarse cell
    return (coarse[:, None] + offsets[None, :] * step).ravel()


def _check_fine(name: str, fine: np.ndarray, coarse: np.ndarray, factor: int) -> np.ndarray:
    """Validate a given fine coordinate: k-fold length and block means equal to coarse centres."""
    fine = np.asarray(fine, dtype=np.float64)
    if fine.size != factor * coarse.size:
        raise ValueError(
            f"fine {name} has {fine.size} points; the {factor}-fold refinement of {coarse.size} "
            f"coarse points needs {factor * coarse.size}"
        )
    if coarse.size > 1:
        step = abs(float(np.diff(coarse).mean()))
        centres = fine.reshape(coarse.size, factor).mean(axis=1)
        if not np.allclose(centres, coarse, atol=1e-3 * step, rtol=0):
            raise ValueError(
                f"fine {name} is not nested in the coarse grid: the centres of each block of "
                f"{factor} fine cells must equal the coarse cell centres"
            )
    return fine


def _is_global_lon(lon: np.ndarray) -> bool:
    """True when the longitudes close the circle (n * spacing == 360), so wrap them."""
    if lon.size < 2:
        return False
    return bool(np.isclose(lon.size * abs(float(np.diff(lon).mean())), 360.0, atol=1e-6))


def _interpolate(block: np.ndarray, factor: int, method: str, wrap: bool) -> np.ndarray:
    """Upsample (n, h, w) images by `factor` with torch; periodic in w if `wrap`."""
    x = torch.from_numpy(np.ascontiguousarray(block)).unsqueeze(1)
    if wrap:
        # Periodic padding by p coarse cells maps to exactly p * k fine cells (integer factor,
        # align_corners=False), so the crop below removes exactly the padding.
        x = torch.cat([x[..., -_WRAP:], x, x[..., :_WRAP]], dim=-1)
    if method == "nearest":
        y = F.interpolate(x, scale_factor=factor, mode="nearest")
    else:
        y = F.interpolate(x, scale_factor=factor, mode=method, align_corners=False)
    if wrap:
        y = y[..., _WRAP * factor : -_WRAP * factor]
    return y.squeeze(1).numpy()


def _upsample_var(
    da: xr.DataArray, factor: int, method: str, wrap: bool, chunk: int
) -> tuple[tuple[Hashable, ...], np.ndarray]:
    """Upsample one variable; returns (dims, values) with lat, lon last."""
    other = [d for d in da.dims if d not in ("lat", "lon")]
    da = da.transpose(*other, "lat", "lon")
    dtype = np.result_type(da.dtype, np.float32)  # torch interpolates float32/64 only
    h, w = da.sizes["lat"], da.sizes["lon"]
    lead = [da.sizes[d] for d in other]
    n = int(np.prod(lead)) if lead else 1
    out = np.empty((n, h * factor, w * factor), dtype=dtype)
    # Chunk over the first leading dim (time) so a long period never sits in torch at once.
    lead_dim = other[0] if other else None
    n_lead = da.sizes[lead_dim] if lead_dim else 1
    if n == 0:
        return (*other, "lat", "lon"), out.reshape(*lead, h * factor, w * factor)
    step = max(1, chunk // max(1, n // n_lead))  # images per index of lead_dim: n // n_lead
    done = 0
    for start in range(0, n_lead, step):
        part = da.isel({lead_dim: slice(start, start + step)}) if lead_dim else da
        vals = np.asarray(part.values, dtype=dtype).reshape(-1, h, w)
        up = _interpolate(vals, factor, method, wrap)
        if da.name in NONNEGATIVE:
            np.maximum(up, 0, out=up)
        out[done : done + len(up)] = up
        done += len(up)
    return (*other, "lat", "lon"), out.reshape(*lead, h * factor, w * factor)


def upsample(
    coarse: xr.Dataset | xr.DataArray,
    factor: int,
    method: str,
    fine_lat=None,
    fine_lon=None,
    *,
    chunk: int = 64,
) -> xr.Dataset | xr.DataArray:
    """Interpolate coarse fields onto the exact `factor`-fold finer grid.

    `method` is one of METHODS. Fine coordinates are the cell centres of the refinement unless
    `fine_lat` / `fine_lon` are given (then they must be nested in the coarse grid). Global
    grids are wrapped periodically in longitude. Non-negative variables (tp) are clipped at 0,
    which only ever changes bicubic overshoot. Variables without lat/lon are copied unchanged;
    attrs are kept and the method is recorded in the dataset attrs. Images are processed
    `chunk` time steps at a time.
    """
    if method not in METHODS:
        raise ValueError(f"unknown interpolation method {method!r}; choose one of {METHODS}")
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    factor = int(factor)
    if isinstance(coarse, xr.DataArray):
        name = coarse.name if coarse.name is not None else "__data__"
        out = upsample(coarse.to_dataset(name=name), factor, method, fine_lat, fine_lon,
                       chunk=chunk)
        da = out[name].rename(coarse.name)
        da.attrs = dict(coarse.attrs)
        return da
    for d in ("lat", "lon"):
        if d not in coarse.dims:
            raise ValueError(f"coarse dataset has no {d!r} dimension (dims: {dict(coarse.sizes)})")

    clat, clon = coarse["lat"].values, coarse["lon"].values
    flat = fine_coords(clat, factor) if fine_lat is None else _check_fine(
        "lat", fine_lat, clat, factor)
    flon = fine_coords(clon, factor) if fine_lon is None else _check_fine(
        "lon", fine_lon, clon, factor)
    wrap = _is_global_lon(clon)

    data_vars = {}
    for name, da in coarse.data_vars.items():
        if "lat" not in da.dims or "lon" not in da.dims:
            data_vars[name] = da
            continue
        dims, values = _upsample_var(da, factor, method, wrap, chunk)
        coords = {d: da[d] for d in dims if d in da.coords and d not in ("lat", "lon")}
        data_vars[name] = xr.DataArray(values, dims=dims, coords=coords, attrs=dict(da.attrs))

    # Keep coordinates that do not live on the coarse grid (time, etc.).
    keep = {k: v for k, v in coarse.coords.items() if not {"lat", "lon"} & set(v.dims)}
    out = xr.Dataset(data_vars, coords=keep, attrs=dict(coarse.attrs))
    out = out.assign_coords(
        lat=("lat", flat.astype(clat.dtype), dict(coarse["lat"].attrs)),
        lon=("lon", flon.astype(clon.dtype), dict(coarse["lon"].attrs)),
    )
    out.attrs["downscaling_method"] = f"{method} interpolation (x{factor})"
    return out
