"""Preprocessing throughput: conservative regridding next to memory bandwidth, TILES write/read.

Measured in one run on this machine:
  memory bandwidth   a large numpy copy (bytes read + written per second), best of --repeats;
  regrid             a global 0.25 deg field (720 x 1440, float32, --steps time steps, dask
                     chunks of --time-chunk steps) coarsened conservatively to 1 deg through
                     `downscaler.regrid.coarsen_conservative` (the pairs stage's code path), as
                     GB/s of input + output, and its ratio to the memory bandwidth; next to it
                     the exact block mean in plain numpy (reshape + weights), the floor any
                     exactly nested coarsening could reach;
  tile write         `write_tiles` of those pairs (tiles per second, zarr v3, one sample per chunk);
  tile read          random samples through `TileDataset(max_in_memory=0)` (zarr, no dask).
Prints a table and writes benchmarks/results/bench_regrid_tiles.json.

    .venv/bin/python benchmarks/bench_regrid_tiles.py [--steps 24] [--scheduler threads]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
import xarray as xr
import zarr
from common import memory_bandwidth
from downscaler.pairs import compute_stats, make_pairs
from downscaler.regrid import cell_area_weights, coarsen_conservative
from downscaler.tiles_store import TileDataset, write_tiles

RESULTS = Path(__file__).resolve().parent / "results" / "bench_regrid_tiles.json"


def global_fields(steps: int, res: float, time_chunk: int) -> tuple[xr.Dataset, xr.Dataset]:
    """A dask-chunked global field held in memory (so disk speed does not enter) + statics."""
    lat = np.arange(-90 + res / 2, 90, res)
    lon = np.arange(-180 + res / 2, 180, res)
    rng = np.random.default_rng(0)
    values = 270 + 20 * rng.random((steps, lat.size, lon.size), dtype="float32")
    time_ = np.datetime64("2000-01-01", "ns") + np.arange(steps) * np.timedelta64(1, "h")
    coords = {"time": time_, "lat": lat, "lon": lon}
    fields = xr.Dataset({"t2m": (("time", "lat", "lon"), values)}, coords=coords)
    static = xr.Dataset(
        {"orog": (("lat", "lon"), rng.random((lat.size, lon.size), dtype="float32") * 3000),
         "lsm": (("lat", "lon"), (rng.random((lat.size, lon.size)) > 0.7).astype("float32"))},
        coords={"lat": lat, "lon": lon},
    )
    return fields.chunk({"time": time_chunk}), static


def numpy_block_mean(values: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Exact area-weighted k x k block means of [t, lat, lon] (the nesting floor)."""
    t, n_lat, n_lon = values.shape
    w = weights.astype("float32")[:, None]
    sums = (values * w).reshape(t, n_lat // k, k, n_lon // k, k).sum(axis=(2, 4))
    return sums / (w.reshape(n_lat // k, k).sum(axis=1)[:, None] * k)


def timed(function, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` calls after one warm-up; returns (seconds, last result)."""
    result = function()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="time steps of the global field")
    parser.add_argument("--res", type=float, default=0.25, help="fine grid spacing (degrees)")
    parser.add_argument("--factor", type=int, default=4, help="coarsening factor")
    parser.add_argument("--time-chunk", type=int, default=8, help="dask chunk (time steps)")
    parser.add_argument("--scheduler", default="threads", help="dask local scheduler")
    parser.add_argument("--copy-mb", type=int, default=512, help="size of the bandwidth copy")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    parser.add_argument("--div", type=int, nargs=2, default=[4, 8], help="tiles: div_lat div_lon")
    parser.add_argument("--halo", type=int, default=2, help="tiles: halo (coarse pixels)")
    parser.add_argument("--reads", type=int, default=500, help="random tile reads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    bandwidth = memory_bandwidth(args.copy_mb, args.repeats)
    fields, static = global_fields(args.steps, args.res, args.time_chunk)
    in_bytes = fields["t2m"].nbytes

    with dask.config.set(scheduler=args.scheduler):
        regrid_s, coarse = timed(lambda: coarsen_conservative(fields, args.factor).compute(),
                                 args.repeats)
    out_bytes = coarse["t2m"].nbytes
    weights = cell_area_weights(fields["lat"]).values
    values = fields["t2m"].values
    numpy_s, block = timed(lambda: numpy_block_mean(values, weights, args.factor), args.repeats)
    max_diff = float(np.abs(block - coarse["t2m"].values).max())

    fine, coarse_pairs = make_pairs(fields.compute(), static, args.factor)
    names = ["t2m", "orog", "lsm", "latitude"]
    stats = compute_stats(fine, names)
    tiles_cfg = {"div_lat": args.div[0], "div_lon": args.div[1], "halo": args.halo,
                 "pad_mode": "symmetric"}
    n_tiles = args.steps * args.div[0] * args.div[1]
    with tempfile.TemporaryDirectory(dir=args.out.parent if args.out.parent.exists() else None) \
            as folder:
        store = os.path.join(folder, "tiles.zarr")
        t0 = time.perf_counter()
        write_tiles(fine, coarse_pairs, ["t2m"], ["orog", "lsm", "latitude"], stats, tiles_cfg,
                    store)
        write_s = time.perf_counter() - t0
        store_mb = sum(p.stat().st_size for p in Path(store).rglob("*") if p.is_file()) / 2**20
        data = TileDataset(store, max_in_memory=0)
        uses_dask = any(isinstance(a, dask.array.Array) for a in (data.x, data.y))
        order = np.random.default_rng(1).integers(0, len(data), args.reads)
        data[int(order[0])]  # open the shards' indexes once, as a DataLoader worker would
        t0 = time.perf_counter()
        for index in order:
            x, s, y = data[int(index)]
        read_s = time.perf_counter() - t0
        sample_shapes = {"x": list(x.shape), "static": list(s.shape), "y": list(y.shape)}

    regrid_gbs = (in_bytes + out_bytes) / regrid_s / 1e9
    numpy_gbs = (in_bytes + out_bytes) / numpy_s / 1e9
    rows = [
        ("memory bandwidth (numpy copy, r+w)", f"{bandwidth:.2f} GB/s", ""),
        (f"regrid {fields.sizes['lat']}x{fields.sizes['lon']} -> "
         f"{coarse.sizes['lat']}x{coarse.sizes['lon']}, {args.steps} steps",
         f"{regrid_gbs:.3f} GB/s", f"{regrid_gbs / bandwidth:.1%} of bandwidth, "
         f"{args.steps / regrid_s:.0f} steps/s"),
        ("numpy exact block mean (floor)", f"{numpy_gbs:.3f} GB/s",
         f"{numpy_gbs / bandwidth:.1%} of bandwidth, max |diff| {max_diff:.1e} K"),
        (f"tile write ({args.div[0]}x{args.div[1]} tiles, halo {args.halo})",
         f"{n_tiles / write_s:.0f} tiles/s", f"{store_mb:.0f} MB store, {write_s:.2f} s"),
        ("random tile read (TileDataset, zarr, no dask)", f"{args.reads / read_s:.0f} tiles/s",
         f"{1e3 * read_s / args.reads:.2f} ms/tile, y {sample_shapes['y']}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'rate':>14}  notes")
    for name, rate, note in rows:
        print(f"{name:<{width}}  {rate:>14}  {note}")

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "dask": dask.__version__, "xarray": xr.__version__,
                    "zarr": zarr.__version__},
        "memory_bandwidth_gbs": bandwidth,
        "regrid": {"seconds": regrid_s, "bytes_in": in_bytes, "bytes_out": out_bytes,
                   "gbs": regrid_gbs, "ratio_to_bandwidth": regrid_gbs / bandwidth,
                   "steps_per_s": args.steps / regrid_s},
        "numpy_block_mean": {"seconds": numpy_s, "gbs": numpy_gbs,
                             "ratio_to_bandwidth": numpy_gbs / bandwidth,
                             "max_abs_diff_vs_regrid": max_diff},
        "tile_write": {"seconds": write_s, "tiles": n_tiles, "tiles_per_s": n_tiles / write_s,
                       "store_mb": store_mb},
        "tile_read": {"reads": args.reads, "seconds": read_s, "tiles_per_s": args.reads / read_s,
                      "ms_per_tile": 1e3 * read_s / args.reads, "uses_dask": uses_dask,
                      "sample_shapes": sample_shapes},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
