"""Regridding behind one interface: xESMF where its engine (esmpy) imports, xarray-regrid otherwise.

`regrid(ds, target, method)` is the only entry point the workflow needs:
  conservative  area-weighted; the method for coarsening (and valid for refining too),
  bilinear      point interpolation; for refining only (e.g. a CMIP6 grid onto the coarse grid),
  nearest       for masks and categorical fields (values copied, never averaged); refining only.
Point interpolation onto a COARSER grid only subsamples (aliasing, 2.9 K RMSE on a noisy field),
so `regrid` REFUSES it with a ValueError that says to use conservative instead.

Coarsening for training pairs is an exact k-fold nesting of the fine grid: coarse cell (i, j)
covers fine cells [k*i, k*i+k) x [k*j, k*j+k), so a tile of the coarse grid and the matching tile
of the fine grid cover the same area. Grids are normalised on input (lat ascending, lon in
-180..180); global grids are periodic in longitude, so target cells at the date line get their
neighbours from the other side. Everything stays lazy (dask) along time: the weights act on
lat/lon only, so each time chunk is regridded on its own and memory is bounded by the chunk.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import xarray as xr
import xarray_regrid  # noqa: F401  (registers the `.regrid` accessor)
from xarray_regrid.methods.conservative import conservative_regrid

from downscaler.settings import schema_defaults

REGRID_DEFAULTS = schema_defaults("regrid")  # the keyword defaults below: the schema's

BACKENDS = ("auto", "xesmf", "xarray-regrid")
METHODS = ("conservative", "bilinear", "nearest")
XESMF_METHODS = {"conservative": "conservative", "bilinear": "bilinear", "nearest": "nearest_s2d"}


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


def is_periodic(lon: np.ndarray) -> bool:
    """True for a global grid whose longitudes wrap around (n * spacing == 360)."""
    lon = np.asarray(lon, dtype="float64")
    return lon.size > 1 and abs(lon.size * float(np.diff(lon).mean()) - 360.0) < 1e-6


def normalise_grid(ds: xr.Dataset) -> xr.Dataset:
    """Canonical horizontal grid: dims lat/lon, lat ascending, lon in -180..180 and ascending.

    A no-op (no copy, no dask work) when the grid is already canonical. A regional grid that
    crosses the date line keeps 0..360 longitudes, since wrapping would split it in two.
    """
    renames = {old: new for old, new in (("latitude", "lat"), ("longitude", "lon"))
               if old in ds.dims and new not in ds.dims}
    ds = ds.rename(renames) if renames else ds
    for dim in ("lat", "lon"):
        if dim not in ds.dims:
            raise ValueError(f"regridding needs dims 'lat' and 'lon'; the data has {list(ds.dims)}")
    lat = ds["lat"].values
    if lat.size > 1 and not np.all(np.diff(lat) > 0):
        ds = ds.sortby("lat")
    lon = ds["lon"].values.astype("float64")
    if lon.size > 1 and (lon.min() < -180 or lon.max() >= 180 or not np.all(np.diff(lon) > 0)):
        wrapped = (lon + 180.0) % 360.0 - 180.0
        steps = np.diff(np.sort(wrapped))
        # a regional grid across the date line would get a gap: keep it in 0..360 then
        contiguous = steps.size == 0 or steps.max() <= 1.5 * np.median(steps)
        if contiguous or is_periodic(np.sort(wrapped)):
            ds = ds.assign_coords(lon=("lon", wrapped, ds["lon"].attrs))
        else:
            ds = ds.assign_coords(lon=("lon", lon % 360.0, ds["lon"].attrs))
        ds = ds.sortby("lon")
        _, first = np.unique(ds["lon"].values, return_index=True)
        if first.size < ds.sizes["lon"]:  # 0..360 with both ends: the duplicate carries nothing
            ds = ds.isel(lon=np.sort(first))
    return ds


def _spacing(values: np.ndarray) -> float:
    return float(np.abs(np.diff(values)).mean()) if values.size > 1 else float("inf")


def _check_not_coarser(ds: xr.Dataset, target: xr.Dataset, method: str) -> None:
    for dim in ("lat", "lon"):
        src, dst = _spacing(ds[dim].values), _spacing(target[dim].values)
        if dst > src * (1 + 1e-6):
            raise ValueError(
                f"regrid method {method!r} onto a coarser grid ({dim} spacing {src:g} -> "
                f"{dst:g} deg) only subsamples the field; use method 'conservative' to coarsen"
            )


def regrid(
    ds: xr.Dataset,
    target_grid: xr.Dataset,
    method: str = "conservative",
    backend: str = REGRID_DEFAULTS.backend,
    nan_threshold: float = REGRID_DEFAULTS.nan_threshold,
) -> xr.Dataset:
    """Regrid `ds` (dims lat, lon and optionally time, lazy or not) onto `target_grid`'s lat/lon.

    `nan_threshold` is the area fraction of valid (non-NaN) source cells a target cell needs to
    be valid; below it the target is NaN (never filled). Bilinear/nearest onto a coarser grid is
    refused (ValueError). Output keeps the input dtype and attributes and the target coordinates.
    """
    if method not in METHODS:
        raise ValueError(f"regrid method must be one of {METHODS}, got {method!r}")
    if not 0.0 <= nan_threshold <= 1.0:
        raise ValueError(f"regrid.nan_threshold must be within [0, 1], got {nan_threshold}")
    ds = normalise_grid(ds)
    target = normalise_grid(xr.Dataset(coords={"lat": target_grid["lat"],
                                               "lon": target_grid["lon"]}))
    if method != "conservative":
        _check_not_coarser(ds, target, method)
    engine = resolve_backend(backend)
    if engine == "xesmf":
        out = _xesmf_regrid(ds, target, method, nan_threshold)
    elif method == "conservative":
        out = _xarray_regrid_conservative(ds, target, nan_threshold)
    elif method == "bilinear":
        # the accessor wraps longitude (global grids) and pads the poles before xr.interp
        out = ds.regrid.linear(target)
    else:
        out = _nearest(ds, target)
    out = out.assign_coords(lat=target["lat"], lon=target["lon"])
    for name, var in ds.data_vars.items():
        out[name] = out[name].astype(var.dtype).transpose(*var.dims)
        out[name].attrs = var.attrs
    out.attrs = ds.attrs
    return out


def _wrap_lon(ds: xr.Dataset, target: xr.Dataset) -> xr.Dataset:
    """Pad a global grid with columns from the other side of the date line (lon -/+ 360).

    Only as many columns as the target's outermost cells need, so an exactly nested target
    (the training pairs) gets none and its graph stays as small as possible.
    """
    lon = ds["lon"].values.astype("float64")
    if not is_periodic(lon):
        return ds
    src_edges, dst_edges = _bounds(lon), _bounds(target["lon"].values.astype("float64"))
    step = 360.0 / lon.size
    left = int(np.ceil(max(src_edges[0] - dst_edges[0], 0.0) / step - 1e-9))
    right = int(np.ceil(max(dst_edges[-1] - src_edges[-1], 0.0) / step - 1e-9))
    if left == 0 and right == 0:
        return ds
    parts = []
    if left:
        parts.append(ds.isel(lon=slice(lon.size - left, None)).assign_coords(
            lon=lon[lon.size - left:] - 360.0))
    parts.append(ds)
    if right:
        parts.append(ds.isel(lon=slice(0, right)).assign_coords(lon=lon[:right] + 360.0))
    return xr.concat(parts, dim="lon", data_vars="all", coords="minimal", compat="override",
                     join="outer")


def _nearest(ds: xr.Dataset, target: xr.Dataset) -> xr.Dataset:
    """Nearest source cell by index selection: values are copied, never averaged (masks).

    The accessor's nearest would pick the zonal-mean rows it pads at the poles, which turns a
    0/1 mask into fractions there. Distances in longitude wrap on global grids; target points
    more than one source spacing outside a regional source are NaN.
    """
    picks, outside = {}, []
    for dim in ("lat", "lon"):
        src = ds[dim].values.astype("float64")
        dst = target[dim].values.astype("float64")
        dist = np.abs(dst[:, None] - src[None, :])
        if dim == "lon" and is_periodic(src):
            dist = np.minimum(dist, 360.0 - dist % 360.0)
        else:
            step = _spacing(src) if src.size > 1 else 0.0
            out_of_range = (dst < src.min() - step) | (dst > src.max() + step)
            if out_of_range.any():
                outside.append(xr.DataArray(out_of_range, dims=dim))
        picks[dim] = xr.DataArray(dist.argmin(axis=1), dims=dim)
    out = ds.isel(picks).drop_vars(["lat", "lon"])
    for mask in outside:
        out = out.where(~mask)
    return out


def _xarray_regrid_conservative(
    ds: xr.Dataset, target: xr.Dataset, nan_threshold: float
) -> xr.Dataset:
    """xarray-regrid's separable conservative weights, with our own periodic longitude wrap.

    The accessor (`ds.regrid.conservative`) also pads the poles of a global grid with zonal-mean
    rows, which moves the edges of the first and last fine rows and breaks exact k-fold block
    means there (2.6e-2 of the field's std on a 1 deg grid); calling the method directly keeps
    the cells as they are. Its `nan_threshold` counts the missing fraction, ours the valid one.
    """
    grid_vars = [n for n, v in ds.data_vars.items() if {"lat", "lon"} <= set(v.dims)]
    if len(grid_vars) != len(ds.data_vars):
        other = sorted(map(str, set(ds.data_vars) - set(grid_vars)))
        raise ValueError(f"regrid needs every variable on (lat, lon); {other} are not")
    wrapped = _wrap_lon(ds, target)
    return conservative_regrid(wrapped, target, latitude_coord="lat", skipna=True,
                               nan_threshold=1.0 - nan_threshold)


def _xesmf_regrid(ds: xr.Dataset, target: xr.Dataset, method: str, nan_threshold: float):
    """xESMF (ESMF) regridding; cell bounds for conservative, periodic lon for global grids."""
    import xesmf

    def grid(g: xr.Dataset) -> xr.Dataset:
        lat, lon = g["lat"].values.astype("float64"), g["lon"].values.astype("float64")
        out = xr.Dataset(coords={"lat": ("lat", lat), "lon": ("lon", lon)})
        if method == "conservative":
            out = out.assign_coords(lat_b=("lat_b", np.clip(_bounds(lat), -90.0, 90.0)),
                                    lon_b=("lon_b", _bounds(lon)))
        return out

    regridder = xesmf.Regridder(
        grid(ds), grid(target), XESMF_METHODS[method],
        periodic=is_periodic(ds["lon"].values),  # ESMF ignores it for conservative (uses bounds)
        unmapped_to_nan=True,
    )
    # xESMF's na_thres is the missing fraction above which a target is masked
    return regridder(ds, keep_attrs=True, skipna=True, na_thres=1.0 - nan_threshold)


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


def _block_mean_masked(x: np.ndarray, weights: np.ndarray, factor: int,
                       threshold: float) -> np.ndarray:
    """[..., H, W] -> [..., H/k, W/k] area-weighted block means (NaN skipped, thresholded).

    The straightforward float64 version: the reference of the tests, and the path of non-float
    data.
    """
    k = factor
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    valid = np.isfinite(x)
    # sum k columns first (contiguous, in the input precision: k values), then weight the rows
    # by their areas and sum k rows in float64 on the k-times smaller array
    cols = np.where(valid, x, 0).reshape(*lead, h, w // k, k).sum(axis=-1, dtype=np.float64)
    count = valid.reshape(*lead, h, w // k, k).sum(axis=-1, dtype=np.float64)
    wcol = weights.astype(np.float64)[:, None]
    num = (cols * wcol).reshape(*lead, h // k, k, w // k).sum(axis=-2)
    area = (count * wcol).reshape(*lead, h // k, k, w // k).sum(axis=-2)
    full = k * weights.astype(np.float64).reshape(h // k, k).sum(axis=-1)[:, None]
    keep = (area > 0) & (area >= threshold * full * (1 - 1e-9))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(keep, num / np.where(area > 0, area, 1.0), np.nan)
    return out.astype(x.dtype)


@functools.lru_cache(maxsize=16)
def _row_weights(weights: tuple[float, ...], factor: int, dtype: str) -> tuple[np.ndarray, ...]:
    """Per row offset r in a block: the fine rows' area weights over (k x the block's area).

    Computed once per grid (cached): sum_r w_r * (sum of the k cells of row r) is then the block
    mean directly, with no division per value.
    """
    w = np.asarray(weights, dtype=np.float64)
    norm = w / np.repeat(factor * w.reshape(-1, factor).sum(axis=1), factor)
    return tuple(norm[r::factor].astype(dtype)[:, None] for r in range(factor))


# Time steps per inner block: its k-times smaller row sums stay in the CPU cache (~0.4 MB for a
# Europe-size 0.25 deg grid at k = 4), so the input is read from memory once.
_BLOCK_BYTES = 2**21


def _weighted_blocks(part: np.ndarray, rows: tuple[np.ndarray, ...], k: int, acc: np.ndarray,
                     tmp: np.ndarray, out: np.ndarray) -> None:
    """out = block means of part [n, H, W] (rows: `_row_weights`), through preallocated
    buffers: weighted sum of the k rows of each block (contiguous rows), then of k columns on
    the k-times smaller result."""
    np.multiply(part[:, 0::k], rows[0], out=acc)
    for r in range(1, k):
        np.multiply(part[:, r::k], rows[r], out=tmp)
        acc += tmp
    np.add(acc[..., 0::k], acc[..., 1::k], out=out)
    for c in range(2, k):
        out += acc[..., c::k]


def _block_mean_array(x: np.ndarray, weights: np.ndarray, factor: int,
                      threshold: float) -> np.ndarray:
    """[..., H, W] -> [..., H/k, W/k] area-weighted block means (NaN skipped, thresholded).

    One pass over the input, a few time steps at a time (their intermediates stay in cache).
    NaN and inf propagate into a block's mean, so only the steps whose result is not finite
    are redone with NaN skipped: the same weighted sums of the zero-filled values and of the
    valid mask (whose block sum is the valid area fraction, compared with `threshold`).
    """
    k = factor
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    if x.dtype.kind != "f" or not x.size:
        return _block_mean_masked(x, weights, factor, threshold)
    flat = np.ascontiguousarray(x).reshape(-1, h, w)
    out = np.empty((flat.shape[0], h // k, w // k), dtype=x.dtype)
    rows = _row_weights(tuple(map(float, weights)), k, x.dtype.str)
    step = max(1, _BLOCK_BYTES // max(1, h * w * x.itemsize))
    acc = np.empty((step, h // k, w), dtype=x.dtype)
    tmp = np.empty_like(acc)
    for start in range(0, flat.shape[0], step):
        part, n = flat[start:start + step], min(step, flat.shape[0] - start)
        o = out[start:start + n]
        _weighted_blocks(part, rows, k, acc[:n], tmp[:n], o)
        if np.isfinite(o).all():
            continue
        valid = np.isfinite(part)
        _weighted_blocks(np.where(valid, part, 0), rows, k, acc[:n], tmp[:n], o)
        area = np.empty_like(o)
        _weighted_blocks(valid.astype(x.dtype), rows, k, acc[:n], tmp[:n], area)
        # the area fraction is a float32 sum of k*k weights: compare within 1e-6
        keep = (area > 0) & (area >= threshold * (1 - 1e-6))
        with np.errstate(invalid="ignore", divide="ignore"):
            o[...] = np.where(keep, o / area, np.nan)
    return out.reshape(*lead, h // k, w // k)


def coarse_grid(fine: xr.Dataset, factor: int) -> xr.Dataset:
    """Target grid whose cells are exact k x k blocks of the (cropped) fine cells."""
    lat = fine["lat"].values.reshape(-1, factor).mean(axis=1)
    lon = fine["lon"].values.reshape(-1, factor).mean(axis=1)
    return xr.Dataset(
        coords={"lat": ("lat", lat, fine["lat"].attrs), "lon": ("lon", lon, fine["lon"].attrs)}
    )


def coarsen_conservative(
    ds: xr.Dataset,
    factor: int,
    backend: str = REGRID_DEFAULTS.backend,
    nan_threshold: float = REGRID_DEFAULTS.nan_threshold,
) -> xr.Dataset:
    """Conservatively coarsen `ds` (dims lat, lon, optionally time) by an integer factor.

    The grid is normalised and cropped to a multiple of `factor` first, so the result is the
    exact area-weighted k x k block mean; see `regrid` for `nan_threshold`. `backend` auto (or
    block-mean) computes the block means directly (`block_mean`: one pass over the input, about
    10x xarray-regrid's throughput, ~17-28% of the memory-copy bandwidth on 2 cores:
    benchmarks/bench_regrid.py); xesmf / xarray-regrid go through `regrid`.
    """
    if factor < 1:
        raise ValueError(f"regrid.factor must be >= 1, got {factor}")
    fine = crop_to_multiple(normalise_grid(ds), factor)
    if factor == 1:
        return fine
    if backend in ("auto", "block-mean"):
        return block_mean(fine, factor, nan_threshold)
    return regrid(fine, coarse_grid(fine, factor), "conservative", backend, nan_threshold)


def block_mean(fine: xr.Dataset, factor: int,
               nan_threshold: float = REGRID_DEFAULTS.nan_threshold) -> xr.Dataset:
    """Exact conservative k x k block means (the fast path of `coarsen_conservative`).

    When the coarse cells are exact blocks of fine cells, conservative regridding is the mean
    of each block weighted by the fine cells' spherical areas (longitude weights are equal);
    no weight matrix is needed. NaN cells are skipped; a block whose valid area fraction is
    below `nan_threshold` is NaN (any valid cell is enough when it is 0). Lazy on dask data.
    """
    if not 0.0 <= nan_threshold <= 1.0:
        raise ValueError(f"regrid.nan_threshold must be within [0, 1], got {nan_threshold}")
    off = [n for n, v in fine.data_vars.items() if not {"lat", "lon"} <= set(v.dims)]
    if off:
        raise ValueError(f"regrid needs every variable on (lat, lon); {sorted(map(str, off))} "
                         "are not")
    weights = cell_area_weights(fine["lat"]).values
    grid = coarse_grid(fine, factor)
    shape = (grid.sizes["lat"], grid.sizes["lon"])
    kwargs = {"weights": weights, "factor": factor, "threshold": nan_threshold}
    out = {}
    for name, da in fine.data_vars.items():
        dims = [d for d in da.dims if d not in ("lat", "lon")] + ["lat", "lon"]
        data = da.transpose(*dims).data
        if isinstance(data, np.ndarray):
            mean = _block_mean_array(data, **kwargs)
        else:
            # map_blocks hands each chunk over as it is; xr.apply_ufunc (apply_gufunc) copies
            # every input chunk first, which cost ~40% of the throughput
            data = data.rechunk({data.ndim - 2: -1, data.ndim - 1: -1})
            mean = data.map_blocks(_block_mean_array, dtype=data.dtype,
                                   chunks=(*data.chunks[:-2], (shape[0],), (shape[1],)),
                                   **kwargs)
        coords = {k: c for k, c in da.coords.items() if not {"lat", "lon"} & set(c.dims)}
        out[name] = xr.DataArray(mean, coords=coords, dims=dims,
                                 attrs=da.attrs).transpose(*da.dims)
    result = xr.Dataset(out, attrs=fine.attrs)
    return result.assign_coords(lat=grid["lat"], lon=grid["lon"])


def _bounds(centres: np.ndarray) -> np.ndarray:
    """Cell edges of a regular 1-D grid: midpoints, extrapolated half a step at both ends.

    Not clipped: callers clip latitude to +-90 (longitude edges beyond +-90 are real).
    """
    step = np.diff(centres).mean() if centres.size > 1 else 1.0
    return np.concatenate([[centres[0] - step / 2], (centres[:-1] + centres[1:]) / 2,
                           [centres[-1] + step / 2]])


def cell_area_weights(lat: xr.DataArray) -> xr.DataArray:
    """Relative spherical cell areas of a regular grid: sin(lat_north) - sin(lat_south)."""
    edges = np.deg2rad(np.clip(_bounds(lat.values), -90, 90))
    return xr.DataArray(np.diff(np.sin(edges)), coords={"lat": lat}, dims="lat")


def area_mean(da: xr.DataArray) -> xr.DataArray:
    """Area-weighted mean over lat and lon (exact spherical cell areas)."""
    return da.weighted(cell_area_weights(da["lat"])).mean(("lat", "lon"))
