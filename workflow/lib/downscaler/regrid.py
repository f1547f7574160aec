"""Regridding behind one interface: xESMF where its engine (esmpy) imports, xarray-regrid otherwise.

Coarsening is always conservative (area-weighted), since point interpolation onto a coarser grid
only subsamples. The coarse grid is built as an exact k-fold nesting of the fine one: coarse cell
(i, j) covers fine cells [k*i, k*i+k) x [k*j, k*j+k), so a tile of the coarse grid and the matching
tile of the fine grid cover the same area. Everything stays lazy (dask) along time.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import xarray as xr
import xarray_regrid  # noqa: F401  (registers the `.regrid` accessor)

BACKENDS = ("auto", "xesmf", "xarray-regrid")


def resolve_backend(backend: str = "auto") -> str:
    """Pick the backend: `auto` uses xESMF when esmpy imports (conda envs), else xarray-regrid."""
    if backend not in BACKENDS:
        raise ValueError(f"regrid backend must be one of {BACKENDS}, got {backend!r}")
    has_esmpy = importlib.util.find_spec("esmpy") is not None
    if backend == "auto":
        return "xesmf" if has_esmpy else "xarray-regrid"
    if backend == "xesmf" and not has_esmpy:
        raise ImportError(
            "regrid.backend 'xesmf' needs esmpy, which exists only on conda-forge "
            "(conda install -c conda-forge esmpy xesmf); use backend 'auto' or 'xarray-regrid'"
        )
    return backend


def crop_to_multiple(ds: xr.Dataset, factor: int) -> xr.Dataset:
    """Drop trailing rows/columns so both grid sizes are multiples of `factor`."""
    n_lat = ds.sizes["lat"] - ds.sizes["lat"] % factor
    n_lon = ds.sizes["lon"] - ds.sizes["lon"] % factor
    if n_lat == 0 or n_lon == 0:
        raise ValueError(
            f"a {ds.sizes['lat']}x{ds.sizes['lon']} grid is smaller than the coarsening "
            f"factor {factor}: enlarge the region or lower regrid.factor"
        )
    return ds.isel(lat=slice(0, n_lat), lon=slice(0, n_lon))


def coarse_grid(fine: xr.Dataset, factor: int) -> xr.Dataset:
    """Target grid whose cells are exact k x k blocks of the (cropped) fine cells."""
    lat = fine["lat"].values.reshape(-1, factor).mean(axis=1)
    lon = fine["lon"].values.reshape(-1, factor).mean(axis=1)
    return xr.Dataset(
        coords={"lat": ("lat", lat, fine["lat"].attrs), "lon": ("lon", lon, fine["lon"].attrs)}
    )


def coarsen_conservative(ds: xr.Dataset, factor: int, backend: str = "auto") -> xr.Dataset:
    """Conservatively coarsen `ds` (dims lat, lon, optionally time) by an integer factor."""
    if factor < 1:
        raise ValueError(f"regrid.factor must be >= 1, got {factor}")
    fine = crop_to_multiple(ds, factor)
    target = coarse_grid(fine, factor)
    if factor == 1:
        return fine
    engine = resolve_backend(backend)
    if engine == "xesmf":
        out = _xesmf_conservative(fine, target)
    else:
        # skipna keeps land-only (NaN over sea) fields NaN-aware instead of poisoning blocks.
        out = fine.regrid.conservative(target, latitude_coord="lat", skipna=True)
    out = out.assign_coords(lat=target["lat"], lon=target["lon"])
    for name, var in fine.data_vars.items():
        out[name].attrs = var.attrs
        out[name] = out[name].astype(var.dtype)
    out.attrs = fine.attrs
    return out


def _xesmf_conservative(fine: xr.Dataset, target: xr.Dataset) -> xr.Dataset:
    import xesmf

    def with_bounds(grid: xr.Dataset) -> xr.Dataset:
        lat_b, lon_b = _bounds(grid["lat"].values), _bounds(grid["lon"].values)
        return grid.assign_coords(lat_b=("lat_b", lat_b), lon_b=("lon_b", lon_b))

    regridder = xesmf.Regridder(with_bounds(fine), with_bounds(target), "conservative")
    return regridder(fine, keep_attrs=True)


def _bounds(centres: np.ndarray) -> np.ndarray:
    step = np.diff(centres).mean() if centres.size > 1 else 1.0
    edges = np.concatenate([[centres[0] - step / 2], (centres[:-1] + centres[1:]) / 2,
                            [centres[-1] + step / 2]])
    return np.clip(edges, -90, 90) if centres.min() >= -90 and centres.max() <= 90 else edges


def cell_area_weights(lat: xr.DataArray) -> xr.DataArray:
    """Relative spherical cell areas of a regular grid: sin(lat_north) - sin(lat_south)."""
    edges = np.deg2rad(np.clip(_bounds(lat.values), -90, 90))
    return xr.DataArray(np.diff(np.sin(edges)), coords={"lat": lat}, dims="lat")


def area_mean(da: xr.DataArray) -> xr.DataArray:
    """Area-weighted mean over lat and lon (exact spherical cell areas)."""
    return da.weighted(cell_area_weights(da["lat"])).mean(("lat", "lon"))
