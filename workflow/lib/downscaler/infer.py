"""Downscaling inference: coarse fields -> tiles with halos -> Reslim -> crop & stitch -> netCDF.

The same tiling as training (from the checkpoint), so each tile sees exactly the context it was
trained with; halos are cropped (or blended) and the cores pasted back. Works through the period
in chunks of time steps, so memory stays bounded by one chunk plus the output.
"""

from __future__ import annotations

import datetime as dt
import json
import platform

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

import downscaler
from downscaler.io import write_netcdf
from downscaler.pairs import denormalise
from downscaler.tiles_store import is_periodic, normalised_stack
from downscaler.tiling import stitch, tile
from downscaler.variables import BY_SHORT_NAME


@torch.no_grad()
def downscale(
    model: torch.nn.Module,
    payload: dict,
    coarse: xr.Dataset,
    fine_static: xr.Dataset,
    batch_size: int = 64,
    blend: bool = False,
    time_chunk: int = 32,
) -> xr.Dataset:
    """Predict the fine fields for every time step of `coarse` (physical units in and out)."""
    variables, statics, stats = payload["variables"], payload["statics"], payload["stats"]
    t = payload["tiling"]
    missing = [v for v in variables if v not in coarse]
    missing += [s for s in statics if s not in fine_static]
    if missing:
        raise KeyError(f"the input lacks {missing}, which the checkpoint was trained with")
    factor, halo = t["factor"], t["halo"]
    if fine_static.sizes["lat"] != factor * coarse.sizes["lat"]:
        raise ValueError(f"fine statics ({fine_static.sizes['lat']} rows) are not a {factor}-fold "
                         f"refinement of the coarse grid ({coarse.sizes['lat']} rows)")
    periodic = is_periodic(coarse["lon"].values)
    opts = {"periodic_lon": periodic, "pad_mode": t["pad_mode"]}
    static_tiles = tile(normalised_stack(fine_static, statics, stats),
                        t["div_lat"], t["div_lon"], factor * halo, **opts)
    static_tiles = torch.from_numpy(np.swapaxes(static_tiles, 0, 1).copy())  # [N, S, ...]
    n_tiles = static_tiles.shape[0]

    out = np.empty((coarse.sizes["time"], len(variables), *fine_static["lat"].shape,
                    *fine_static["lon"].shape), dtype="float32")
    model.eval()
    for t0 in tqdm(range(0, coarse.sizes["time"], time_chunk), desc="downscale", unit="chunk"):
        x = normalised_stack(coarse.isel(time=slice(t0, t0 + time_chunk)), variables, stats)
        x = tile(x, t["div_lat"], t["div_lon"], halo, **opts)  # [t, V, N, h, w]
        steps = x.shape[0]
        x = torch.from_numpy(np.swapaxes(x, 1, 2).reshape(steps * n_tiles, *x.shape[1:2],
                                                          *x.shape[3:]).copy())
        static = static_tiles.repeat(steps, 1, 1, 1)
        pred = torch.cat([model(x[i:i + batch_size], static[i:i + batch_size], payload["res_km"])
                          for i in range(0, len(x), batch_size)])
        pred = pred.reshape(steps, n_tiles, len(variables), *pred.shape[-2:]).numpy()
        fields = stitch(np.swapaxes(pred, 1, 2), t["div_lat"], t["div_lon"], factor * halo,
                        blend=blend, periodic_lon=periodic)
        for v, name in enumerate(variables):
            out[t0:t0 + steps, v] = denormalise(fields[:, v].astype("float64"), stats[name])

    coords = {"time": coarse["time"], "lat": fine_static["lat"], "lon": fine_static["lon"]}
    data = {name: (("time", "lat", "lon"), out[:, v], _cf_attrs(name))
            for v, name in enumerate(variables)}
    return xr.Dataset(data, coords=coords)


def _cf_attrs(name: str) -> dict:
    meta = BY_SHORT_NAME[name]
    return {"units": meta.units, "standard_name": meta.standard_name,
            "long_name": f"downscaled {meta.long_name.replace('_', ' ')}"}


def write_downscaled(ds: xr.Dataset, path: str, payload: dict, checkpoint_sha256: str) -> None:
    """CF-compliant netCDF, chunked by time, with the provenance in global attributes."""
    ds = ds.copy()
    ds["lat"].attrs.update(units="degrees_north", standard_name="latitude", axis="Y")
    ds["lon"].attrs.update(units="degrees_east", standard_name="longitude", axis="X")
    ds["time"].attrs.update(standard_name="time", axis="T")
    ds.attrs.update(
        Conventions="CF-1.10",
        title="Downscaled fields (Reslim + TILES)",
        source=f"downscaler {downscaler.__version__}, Reslim",
        history=f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} downscaled",
        checkpoint_sha256=checkpoint_sha256,
        config=json.dumps(payload.get("config", {}), sort_keys=True),
        software=f"python {platform.python_version()}, torch {torch.__version__}, "
                 f"xarray {xr.__version__}, numpy {np.__version__}",
    )
    n_lat, n_lon = ds.sizes["lat"], ds.sizes["lon"]
    encoding = {name: {"zlib": True, "complevel": 4, "chunksizes": (1, n_lat, n_lon)}
                for name in ds.data_vars}
    write_netcdf(ds, path, encoding=encoding)
