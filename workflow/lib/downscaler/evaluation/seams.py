"""TILES seam check: prediction error as a function of the distance to the nearest tile border.

Tiles are predicted independently, so a pixel next to an inner tile border sees less context on
one side than a pixel in the middle of a tile. With halos wide enough the error should not depend
on that distance; without halos (halo 0) it typically rises towards the borders. The check runs
inference on the same period with several tilings (the trained halo, halo 0, and optionally the
whole domain as one tile) and bins the squared error by border distance of the trained tiling.
Errors are accumulated chunk by chunk, so the period never needs to fit in memory.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import xarray as xr

from downscaler.infer import downscale_chunks, io_variables
from downscaler.settings import schema_defaults
from downscaler.tiles_store import is_periodic

COLUMNS = ["setting", "variable", "distance", "rmse", "n"]


def _axis_distance(n: int, div: int, periodic: bool) -> np.ndarray:
    """Per index along one axis: pixels to the nearest inner tile border (0 = touching it).

    Borders lie between tiles; the domain edges are borders only on a periodic axis (where the
    first and last tiles meet). Without any border the distance is +inf.
    """
    size = n // div
    borders = [k * size for k in range(1, div)] + ([0] if periodic and div > 1 else [])
    idx = np.arange(n)
    if not borders:
        return np.full(n, np.inf)
    dist = np.full(n, np.inf)
    for b in borders:
        # Pixel b is the first after the border, b - 1 the last before it: both at distance 0.
        d = np.where(idx >= b, idx - b, b - 1 - idx)
        if periodic:
            d = np.minimum(d, np.where(idx >= b, n - 1 - idx + b, idx + n - b))
        dist = np.minimum(dist, d)
    return dist


def border_distance(n_lat: int, n_lon: int, div_lat: int, div_lon: int,
                    periodic_lon: bool = False) -> np.ndarray:
    """[n_lat, n_lon] distance in pixels from each pixel to its nearest inner tile border."""
    rows = _axis_distance(n_lat, div_lat, periodic=False)
    cols = _axis_distance(n_lon, div_lon, periodic=periodic_lon)
    return np.minimum(rows[:, None], cols[None, :])


def rmse_by_distance(sse: np.ndarray, count: np.ndarray, distance: np.ndarray) -> pd.DataFrame:
    """RMSE per integer border distance from per-pixel sums of squared errors and counts.

    `sse` and `count` are [lat, lon] sums over time; pixels with infinite distance (no border
    along either axis) are left out.
    """
    finite = np.isfinite(distance)
    d = distance[finite].astype(int)
    sums = np.bincount(d, weights=sse[finite])
    counts = np.bincount(d, weights=count[finite])
    keep = counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        rmse = np.sqrt(sums[keep] / counts[keep])
    return pd.DataFrame({"distance": np.arange(len(sums))[keep], "rmse": rmse,
                         "n": counts[keep].astype(int)})


def seam_settings(payload: dict,
                  whole_domain: bool = schema_defaults("evaluate.seams").whole_domain,
                  ) -> dict[str, dict]:
    """The tilings compared: the trained halo, no halo, and (optionally) no tiles at all."""
    halo = payload["tiling"]["halo"]
    settings = {f"halo {halo} (as trained)": {}, "halo 0": {"halo": 0}}
    if halo == 0:
        settings = {"halo 0 (as trained)": {}}
    one_tile = payload["tiling"]["div_lat"] == payload["tiling"]["div_lon"] == 1
    if whole_domain and not one_tile:
        settings["whole domain, no tiles"] = {"halo": 0, "div": (1, 1)}
    return settings


@torch.no_grad()
def seam_errors(
    model: torch.nn.Module,
    payload: dict,
    coarse: xr.Dataset,
    fine: xr.Dataset,
    settings: dict[str, dict] | None = None,
    *,
    batch_size: int,
    time_chunk: int,
) -> pd.DataFrame:
    """Tidy RMSE by distance to the trained tiling's borders (setting, variable, distance, rmse, n).

    `fine` holds the truth (same times as `coarse`) and the statics; distances are in fine
    pixels. Each setting is a dict of `downscale_chunks` overrides (`halo`, `div`). With one
    tile (no inner border) the table is empty. `batch_size` and `time_chunk` are the `infer`
    section's.
    """
    settings = seam_settings(payload) if settings is None else settings
    t = payload["tiling"]
    variables = io_variables(payload)[1]  # the targets
    distance = border_distance(fine.sizes["lat"], fine.sizes["lon"], t["div_lat"], t["div_lon"],
                               is_periodic(coarse["lon"].values))
    if not np.isfinite(distance).any():
        # a single tile has no inner border: no seam to measure, and no inference needed
        return pd.DataFrame(columns=COLUMNS)
    static = fine[payload["statics"]].load()
    frames = []
    for label, overrides in settings.items():
        sse = {v: np.zeros(distance.shape) for v in variables}
        count = {v: np.zeros(distance.shape) for v in variables}
        for chunk in downscale_chunks(model, payload, coarse, static, batch_size,
                                      time_chunk=time_chunk, progress=False, **overrides):
            truth = fine[variables].sel(time=chunk["time"]).load()
            for v in variables:
                err = (chunk[v].values.astype("float64")
                       - truth[v].transpose("time", "lat", "lon").values)
                ok = np.isfinite(err)
                sse[v] += np.where(ok, err**2, 0).sum(axis=0)
                count[v] += ok.sum(axis=0)
        for v in variables:
            df = rmse_by_distance(sse[v], count[v], distance)
            df.insert(0, "variable", v)
            df.insert(0, "setting", label)
            frames.append(df)
    return pd.concat(frames, ignore_index=True)[COLUMNS]
