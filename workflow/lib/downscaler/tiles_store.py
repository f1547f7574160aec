"""TILES patches on disk: normalised coarse/fine tile pairs in zarr v3, and the torch Dataset.

Layout of one split's store:
  x       [time, tile, var, h + 2H, w + 2H]              normalised coarse inputs
  y       [time, tile, var, k(h + 2H), k(w + 2H)]        normalised fine targets
  mask    [time, tile, var, k(h + 2H), k(w + 2H)]        uint8, 1 = valid target (y is NaN where 0)
  static  [tile, static, k(h + 2H), k(w + 2H)]           normalised fine statics (time-invariant)
One sample (time, tile) per chunk, grouped in shards along time, so a random sample costs one
small read and the store is a handful of files. Attributes carry everything inference needs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import xarray as xr
import zarr
from torch.utils.data import Dataset

from downscaler.io import atomic_path
from downscaler.pairs import normalise
from downscaler.settings import TilesConfig, from_schema
from downscaler.tiling import tile

KM_PER_DEGREE = 111.195  # great-circle km per degree of latitude


def is_periodic(lon: np.ndarray) -> bool:
    """True for a global grid whose longitudes wrap around (n * spacing == 360)."""
    return lon.size > 1 and abs(lon.size * float(np.diff(lon).mean()) - 360.0) < 1e-6


def grid_spacing_km(coarse: xr.Dataset) -> float:
    """Coarse grid spacing in km (latitude direction), fed to the resolution embedding."""
    return float(np.diff(coarse["lat"].values).mean()) * KM_PER_DEGREE


def normalised_stack(ds: xr.Dataset, names: list[str], stats: dict) -> np.ndarray:
    """[..., var, lat, lon] float32 array of normalised variables (time first if present).

    One variable at a time in float64 (so the normalisation is exact) into a float32 result,
    which bounds the peak to the result plus one variable. NaN (missing data) stays NaN.
    """
    if not names:  # only statics may be none (config statics: []): an empty [0, lat, lon]
        return np.empty((0, ds.sizes["lat"], ds.sizes["lon"]), dtype="float32")
    first = ds[names[0]]
    out = np.empty((*first.shape[:-2], len(names), *first.shape[-2:]), dtype="float32")
    for i, name in enumerate(names):
        out[..., i, :, :] = normalise(ds[name].values.astype("float64"), stats[name])
    return out


def window_steps(fine_tile_bytes_per_step: int, memory_mb: float, time_chunk: int) -> int:
    """Time steps per write window (= per shard) so one window stays within ~`memory_mb`.

    A window holds the normalised fields, their padded copy and the stacked tiles of both grids
    plus the mask: about 6x the fine tiles' float32 bytes, hence the divisor.
    """
    per_step = 6 * max(1, fine_tile_bytes_per_step)
    return max(1, min(time_chunk, int(memory_mb * 2**20) // per_step))


def write_tiles(
    fine: xr.Dataset,
    coarse: xr.Dataset,
    variables: list[str],
    statics: list[str],
    stats: dict,
    tiles_cfg: TilesConfig | Mapping,
    path: str,
    time_chunk: int = 64,
    memory_mb: float | None = None,
    inputs: list[str] | None = None,
) -> None:
    """Tile one split (fine and coarse over the same times) into a zarr store, atomically.

    `variables` are the targets (`y`, from `fine`), `inputs` the model inputs (`x`, from
    `coarse`; default: the targets). The attributes name both (`variables` = targets, `inputs`).

    Works through time in windows of at most `time_chunk` steps and about `memory_mb` MB
    (default: tiles.memory_mb; a plain mapping `tiles_cfg` is completed from the
    schema), reading only that window of each variable; each window
    is one shard, so writes never re-read a shard. Missing data: targets `y` keep NaN and the
    store has a `mask` array (uint8, 1 = valid target, same shape as `y`) that the loss must
    apply; inputs `x` cannot be NaN for the model, so missing inputs (coarse cells below
    regrid.nan_threshold) are set to 0 (the train mean) and counted in attrs `filled_inputs`.
    """
    inputs = list(variables) if inputs is None else list(inputs)
    factor = fine.sizes["lat"] // coarse.sizes["lat"]
    tiles_cfg = from_schema("tiles", tiles_cfg)
    div_lat, div_lon, halo = tiles_cfg.div_lat, tiles_cfg.div_lon, tiles_cfg.halo
    periodic = is_periodic(coarse["lon"].values)
    options = {"periodic_lon": periodic, "pad_mode": tiles_cfg.pad_mode}
    if memory_mb is None:
        memory_mb = tiles_cfg.memory_mb

    def coarse_tiles(a):
        return tile(a, div_lat, div_lon, halo, **options)

    def fine_tiles(a):
        return tile(a, div_lat, div_lon, factor * halo, **options)

    static = fine_tiles(normalised_stack(fine, statics, stats))  # [S, N, ...]
    static = np.moveaxis(static, -3, 0)  # -> [N, S, ...]
    n_time, n_tiles, n_var = fine.sizes["time"], div_lat * div_lon, len(variables)
    n_in = len(inputs)
    x_shape = coarse_tiles(np.zeros(coarse["lat"].shape + coarse["lon"].shape)).shape[1:]
    y_shape = fine_tiles(np.zeros(fine["lat"].shape + fine["lon"].shape)).shape[1:]
    times = np.datetime_as_string(fine["time"].values, unit="s").tolist()
    shard_t = window_steps(4 * n_tiles * n_var * int(np.prod(y_shape)), memory_mb,
                           max(1, min(n_time, time_chunk)))
    filled_inputs = missing_targets = 0

    with atomic_path(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)

        def array(name, shape, dtype="float32", fill_value=None, n=n_var):
            # one sample (time, tile) per chunk for cheap random reads; shards keep files few
            return group.create_array(
                name, shape=(n_time, n_tiles, n, *shape), dtype=dtype,
                chunks=(1, 1, n, *shape), shards=(shard_t, n_tiles, n, *shape),
                fill_value=fill_value,
            )

        x_arr = array("x", x_shape, n=n_in)
        y_arr = array("y", y_shape)
        # fill 1 (= valid): all-valid chunks equal the fill value and are never written to disk
        mask_arr = array("mask", y_shape, dtype="uint8", fill_value=1)
        # zarr refuses zero-length chunks: a store without statics keeps a chunk of 1
        group.create_array("static", data=static, chunks=tuple(max(1, n) for n in static.shape))
        for t0 in range(0, n_time, shard_t):
            window = slice(t0, t0 + shard_t)
            x = coarse_tiles(normalised_stack(coarse.isel(time=window), inputs, stats))
            y = fine_tiles(normalised_stack(fine.isel(time=window), variables, stats))
            # tile() puts tiles after the variable axis: [t, V, N, ...] -> [t, N, V, ...]
            x, y = np.swapaxes(x, 1, 2), np.swapaxes(y, 1, 2)
            x_missing = np.isnan(x)
            if x_missing.any():
                filled_inputs += int(x_missing.sum())
                x[x_missing] = 0.0
            valid = np.isfinite(y)
            missing_targets += int(valid.size - np.count_nonzero(valid))
            x_arr[window] = x
            y_arr[window] = y
            mask_arr[window] = valid.view("uint8")
        group.attrs.update(
            variables=variables, inputs=inputs, targets=variables, statics=statics, times=times,
            factor=factor,
            div_lat=div_lat, div_lon=div_lon, halo=halo, pad_mode=tiles_cfg.pad_mode,
            periodic_lon=periodic, res_km=grid_spacing_km(coarse), stats=stats,
            filled_inputs=filled_inputs, missing_targets=missing_targets,
        )


class TileDataset(Dataset):
    """Samples (x, static, y) = one tile at one time, read with zarr directly (no dask).

    Small stores (below `max_in_memory` bytes) are loaded once, which is faster on CPU; larger
    ones are read one chunk (= one sample) per array per item. `y` holds NaN where the target
    is missing (`attrs["missing_targets"]` > 0): then pass `return_mask=True` to get
    (x, static, y, mask) with mask a bool tensor (True = valid) and mask the loss with it.
    """

    def __init__(self, path: str, max_in_memory: float = 2e9, return_mask: bool = False):
        self.group = zarr.open_group(str(path), mode="r")
        self.attrs = dict(self.group.attrs)
        self.x, self.y = self.group["x"], self.group["y"]
        self.return_mask = return_mask
        # stores written before the mask existed have no missing targets
        self.mask = self.group["mask"] if "mask" in self.group else None
        self.static = torch.from_numpy(self.group["static"][...])
        if self.x.nbytes + self.y.nbytes < max_in_memory:
            self.x, self.y = self.x[...], self.y[...]
            if return_mask and self.mask is not None:
                self.mask = self.mask[...]
        self.n_time, self.n_tiles = self.x.shape[:2]

    def __len__(self) -> int:
        return self.n_time * self.n_tiles

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        t, n = divmod(index, self.n_tiles)
        x = torch.from_numpy(np.asarray(self.x[t, n]))
        y = torch.from_numpy(np.asarray(self.y[t, n]))
        if not self.return_mask:
            return x, self.static[n], y
        if self.mask is None:
            mask = torch.ones(y.shape, dtype=torch.bool)
        else:
            mask = torch.from_numpy(np.asarray(self.mask[t, n]).astype(bool))
        return x, self.static[n], y, mask
