"""TILES patches on disk: normalised coarse/fine tile pairs in zarr v3, and the torch Dataset.

Layout of one split's store:
  x       [time, tile, var, h + 2H, w + 2H]              normalised coarse inputs
  y       [time, tile, var, k(h + 2H), k(w + 2H)]        normalised fine targets
  static  [tile, static, k(h + 2H), k(w + 2H)]           normalised fine statics (time-invariant)
One sample (time, tile) per chunk, grouped in shards along time, so a random sample costs one
small read and the store is a handful of files. Attributes carry everything inference needs.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
import zarr
from torch.utils.data import Dataset

from downscaler.io import atomic_path
from downscaler.pairs import normalise
from downscaler.tiling import tile

KM_PER_DEGREE = 111.195  # great-circle km per degree of latitude


def is_periodic(lon: np.ndarray) -> bool:
    """True for a global grid whose longitudes wrap around (n * spacing == 360)."""
    return lon.size > 1 and abs(lon.size * float(np.diff(lon).mean()) - 360.0) < 1e-6


def grid_spacing_km(coarse: xr.Dataset) -> float:
    """Coarse grid spacing in km (latitude direction), fed to the resolution embedding."""
    return float(np.diff(coarse["lat"].values).mean()) * KM_PER_DEGREE


def normalised_stack(ds: xr.Dataset, names: list[str], stats: dict) -> np.ndarray:
    """[..., var, lat, lon] float32 array of normalised variables (time first if present)."""
    arrays = [normalise(ds[n].values.astype("float64"), stats[n]) for n in names]
    return np.stack(arrays, axis=-3).astype("float32")


def write_tiles(
    fine: xr.Dataset,
    coarse: xr.Dataset,
    variables: list[str],
    statics: list[str],
    stats: dict,
    tiles_cfg: dict,
    path: str,
    time_chunk: int = 64,
) -> None:
    """Tile one split (fine and coarse over the same times) into a zarr store, atomically."""
    factor = fine.sizes["lat"] // coarse.sizes["lat"]
    div_lat, div_lon, halo = tiles_cfg["div_lat"], tiles_cfg["div_lon"], tiles_cfg["halo"]
    periodic = is_periodic(coarse["lon"].values)
    options = {"periodic_lon": periodic, "pad_mode": tiles_cfg["pad_mode"]}

    def coarse_tiles(a):
        return tile(a, div_lat, div_lon, halo, **options)

    def fine_tiles(a):
        return tile(a, div_lat, div_lon, factor * halo, **options)

    static = fine_tiles(normalised_stack(fine, statics, stats))  # [S, N, ...]
    static = np.moveaxis(static, -3, 0)  # -> [N, S, ...]
    n_time, n_tiles = fine.sizes["time"], div_lat * div_lon
    x_shape = coarse_tiles(np.zeros(coarse["lat"].shape + coarse["lon"].shape)).shape[1:]
    y_shape = static.shape[2:]
    times = np.datetime_as_string(fine["time"].values, unit="s").tolist()

    with atomic_path(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        shard_t = max(1, min(n_time, time_chunk))

        def array(name, var_count, shape):
            return group.create_array(
                name, shape=(n_time, n_tiles, var_count, *shape), dtype="float32",
                chunks=(1, 1, var_count, *shape), shards=(shard_t, n_tiles, var_count, *shape),
            )

        x_arr = array("x", len(variables), x_shape)
        y_arr = array("y", len(variables), y_shape)
        group.create_array("static", data=static, chunks=static.shape)
        for t0 in range(0, n_time, shard_t):
            window = slice(t0, t0 + shard_t)
            x = coarse_tiles(normalised_stack(coarse.isel(time=window), variables, stats))
            y = fine_tiles(normalised_stack(fine.isel(time=window), variables, stats))
            # tile() puts tiles after the variable axis: [t, V, N, ...] -> [t, N, V, ...]
            x_arr[window] = np.swapaxes(x, 1, 2)
            y_arr[window] = np.swapaxes(y, 1, 2)
        group.attrs.update(
            variables=variables, statics=statics, times=times, factor=factor,
            div_lat=div_lat, div_lon=div_lon, halo=halo, pad_mode=tiles_cfg["pad_mode"],
            periodic_lon=periodic, res_km=grid_spacing_km(coarse), stats=stats,
        )


class TileDataset(Dataset):
    """Samples (x, static, y) = one tile at one time, read with zarr directly (no dask).

    Small stores (below `max_in_memory` bytes) are loaded once, which is faster on CPU.
    """

    def __init__(self, path: str, max_in_memory: float = 2e9):
        self.group = zarr.open_group(str(path), mode="r")
        self.attrs = dict(self.group.attrs)
        self.x, self.y = self.group["x"], self.group["y"]
        self.static = torch.from_numpy(self.group["static"][...])
        if self.x.nbytes + self.y.nbytes < max_in_memory:
            self.x, self.y = self.x[...], self.y[...]
        self.n_time, self.n_tiles = self.x.shape[:2]

    def __len__(self) -> int:
        return self.n_time * self.n_tiles

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, n = divmod(index, self.n_tiles)
        x = torch.from_numpy(np.asarray(self.x[t, n]))
        y = torch.from_numpy(np.asarray(self.y[t, n]))
        return x, self.static[n], y
