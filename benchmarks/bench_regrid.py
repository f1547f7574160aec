"""Conservative regridding throughput next to this machine's memory bandwidth (issue 15, target 1).

One year of hourly 0.25 deg data over a Europe-size region (35-72 N, 25 W-45 E: 148 x 280
cells, float32, 1.45 GB) coarsened by an exact k-fold nesting (area-weighted block means with
cos-latitude cell areas, NaN threshold 0.5), measured in one run:

  memory copy      a large numpy copy, bytes read + written per second (best of --repeats);
  block-mean       `coarsen_conservative` (backend auto, the pairs stage's code path) on a lazy
                   dask Dataset, streamed week by week with the threaded scheduler into a
                   preallocated output: GB/s of input + output, its share of the copy bandwidth,
                   and the process's peak RSS. The weekly chunks are views of a pool of
                   --pool distinct random blocks (no data generation inside the timing);
  kernel           the same block means called directly on the pool's blocks (1 thread, no dask);
  with NaN         block-mean on --ref-steps steps whose sea cells are NaN (the masked path);
  xarray-regrid    the reference path on --ref-steps steps, nested (parity with block-mean is
                   reported as max |diff|) and onto a non-nested 1 deg grid;
  xESMF            the same two where esmpy imports (conda envs), else marked as not installed.

Each case runs in its own process (its own peak RSS). Prints a table and writes
results/regrid.json (BENCH_RESULTS_DIR, or benchmarks/results/).

    python benchmarks/bench_regrid.py [--steps 8760] [--chunk 168] [--factor 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import dask
import dask.array as da
import numpy as np
import torch
import xarray as xr
from common import _maxrss_bytes, memory_bandwidth, print_table, run_isolated, write_results
from downscaler.regrid import _block_mean_array, cell_area_weights, coarsen_conservative, regrid

LAT = (35.0, 72.0)
LON = (-25.0, 45.0)


def grid(res: float) -> tuple[np.ndarray, np.ndarray]:
    lat = np.arange(LAT[0] + res / 2, LAT[1], res)
    lon = np.arange(LON[0] + res / 2, LON[1], res)
    return lat, lon


def pool_of_blocks(n: int, chunk: int, res: float) -> list[np.ndarray]:
    lat, lon = grid(res)
    rng = np.random.default_rng(0)
    return [270 + 20 * rng.random((chunk, lat.size, lon.size), dtype="float32") for _ in range(n)]


def lazy_year(steps: int, chunk: int, res: float, pool: list[np.ndarray]) -> xr.Dataset:
    """A dask Dataset of `steps` hourly fields whose chunks are the pool's blocks, in turn."""
    lat, lon = grid(res)
    chunks = [min(chunk, steps - s) for s in range(0, steps, chunk)]

    def block(block_info=None):
        index = block_info[None]["chunk-location"][0]
        return pool[index % len(pool)][: chunks[index]]

    data = da.map_blocks(block, chunks=(tuple(chunks), (lat.size,), (lon.size,)),
                         dtype="float32")
    time_ = np.datetime64("2001-01-01", "ns") + np.arange(steps) * np.timedelta64(1, "h")
    return xr.Dataset({"t2m": (("time", "lat", "lon"), data)},
                      coords={"time": time_, "lat": lat, "lon": lon})


def case_streamed(steps: int, chunk: int, res: float, factor: int, pool_n: int,
                  threads: int, repeats: int) -> dict:
    """The year through coarsen_conservative, week by week, into a preallocated output."""
    pool = pool_of_blocks(pool_n, chunk, res)
    before = _maxrss_bytes() / 2**20
    ds = lazy_year(steps, chunk, res, pool)
    coarse = coarsen_conservative(ds, factor, nan_threshold=0.5)["t2m"]
    out = np.empty(coarse.shape, dtype="float32")
    with dask.config.set(scheduler="threads", num_workers=threads):
        da.store(coarse.data, out, lock=False)  # warm-up (first-touch of out, caches)
        seconds = np.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            da.store(coarse.data, out, lock=False)
            seconds = min(seconds, time.perf_counter() - t0)
    first = _block_mean_array(pool[0], cell_area_weights(ds["lat"]).values, factor, 0.5)
    return {"seconds": seconds, "bytes_in": ds["t2m"].nbytes, "bytes_out": out.nbytes,
            "threads": threads, "peak_rss_mib": _maxrss_bytes() / 2**20, "rss_before_mib": before,
            "pool_mib": sum(p.nbytes for p in pool) / 2**20,
            "first_chunk_matches_kernel": bool(np.array_equal(out[: first.shape[0]], first))}


def case_kernel(chunk: int, res: float, factor: int, pool_n: int, repeats: int) -> dict:
    """The block-mean kernel alone on the pool's blocks, one thread."""
    pool = pool_of_blocks(pool_n, chunk, res)
    weights = cell_area_weights(xr.DataArray(grid(res)[0], dims="lat")).values
    _block_mean_array(pool[0], weights, factor, 0.5)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for block in pool:
            out = _block_mean_array(block, weights, factor, 0.5)
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "bytes_in": sum(p.nbytes for p in pool),
            "bytes_out": out.nbytes * len(pool), "peak_rss_mib": _maxrss_bytes() / 2**20}


def small_field(steps: int, res: float, nan_sea: bool) -> xr.Dataset:
    lat, lon = grid(res)
    rng = np.random.default_rng(1)
    values = 270 + 20 * rng.random((steps, lat.size, lon.size), dtype="float32")
    if nan_sea:  # a smooth 'coast': about a third of the cells NaN, like an SST field
        sea = np.sin(np.deg2rad(lat))[:, None] * 3 + np.cos(np.deg2rad(3 * lon))[None, :] < 2.2
        values[:, sea] = np.nan
    time_ = np.datetime64("2001-01-01", "ns") + np.arange(steps) * np.timedelta64(1, "h")
    return xr.Dataset({"t2m": (("time", "lat", "lon"), values)},
                      coords={"time": time_, "lat": lat, "lon": lon})


def case_reference(steps: int, chunk: int, res: float, factor: int, backend: str,
                   nested: bool, nan_sea: bool) -> dict:
    """`steps` steps through `backend` (block-mean = auto), nested or onto a 1 deg grid shifted
    by 0.1 deg; nested results are compared with the block-mean path."""
    ds = small_field(steps, res, nan_sea).chunk({"time": chunk})
    if nested:
        run = lambda: coarsen_conservative(ds, factor, backend, 0.5)  # noqa: E731
    else:
        target = xr.Dataset(coords={"lat": np.arange(LAT[0] + 0.6, LAT[1] - 1, 1.0),
                                    "lon": np.arange(LON[0] + 0.6, LON[1] - 1, 1.0)})
        run = lambda: regrid(ds, target, "conservative", backend, 0.5)  # noqa: E731
    with dask.config.set(scheduler="threads"):
        run().compute()  # warm-up: weights, imports
        t0 = time.perf_counter()
        out = run()["t2m"].compute()
        seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "bytes_in": ds["t2m"].nbytes, "bytes_out": out.nbytes,
              "peak_rss_mib": _maxrss_bytes() / 2**20}
    if nested:
        fast = coarsen_conservative(ds, factor, "auto", 0.5)["t2m"].compute().values
        ref = out.values
        both = np.isfinite(fast) & np.isfinite(ref)
        result["max_abs_diff_vs_block_mean"] = float(np.abs(fast - ref)[both].max())
        result["max_rel_diff_vs_block_mean"] = float((np.abs(fast - ref) / np.abs(ref))[both].max())
        result["same_nan_cells"] = bool(np.array_equal(np.isnan(fast), np.isnan(ref)))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8760, help="hourly steps (8760: one year)")
    parser.add_argument("--chunk", type=int, default=168, help="time steps per chunk (a week)")
    parser.add_argument("--res", type=float, default=0.25, help="fine grid spacing (degrees)")
    parser.add_argument("--factor", type=int, default=4, help="coarsening factor k")
    parser.add_argument("--pool", type=int, default=4, help="distinct input blocks cycled")
    parser.add_argument("--threads", type=int, default=0, help="dask threads (0: all CPUs)")
    parser.add_argument("--ref-steps", type=int, default=336, help="steps for the slow paths")
    parser.add_argument("--copy-mb", type=int, default=512, help="size of the bandwidth copy")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (best is kept)")
    args = parser.parse_args(argv)
    threads = args.threads or torch.get_num_threads()

    bandwidth = memory_bandwidth(args.copy_mb, args.repeats)
    common = {"res": args.res, "factor": args.factor}
    cases = {
        "block-mean, streamed (dask threads)": run_isolated(
            case_streamed, steps=args.steps, chunk=args.chunk, pool_n=args.pool,
            threads=threads, repeats=args.repeats, **common),
        "block-mean kernel (1 thread, no dask)": run_isolated(
            case_kernel, chunk=args.chunk, pool_n=args.pool, repeats=args.repeats, **common),
        "block-mean with NaN sea": run_isolated(
            case_reference, steps=args.ref_steps, chunk=args.chunk, backend="auto",
            nested=True, nan_sea=True, **common),
        "xarray-regrid nested, NaN sea": run_isolated(
            case_reference, steps=args.ref_steps, chunk=args.chunk, backend="xarray-regrid",
            nested=True, nan_sea=True, **common),
        "xarray-regrid non-nested (1 deg)": run_isolated(
            case_reference, steps=args.ref_steps, chunk=args.chunk, backend="xarray-regrid",
            nested=False, nan_sea=False, **common),
    }
    has_esmpy = importlib.util.find_spec("esmpy") is not None
    if has_esmpy:
        cases["xESMF nested, NaN sea"] = run_isolated(
            case_reference, steps=args.ref_steps, chunk=args.chunk, backend="xesmf",
            nested=True, nan_sea=True, **common)
        cases["xESMF non-nested (1 deg)"] = run_isolated(
            case_reference, steps=args.ref_steps, chunk=args.chunk, backend="xesmf",
            nested=False, nan_sea=False, **common)
    rows = [{"case": "memory copy (numpy, r+w)", "GB/s": bandwidth, "% of copy": 100.0}]
    for name, r in cases.items():
        r["gbs"] = (r["bytes_in"] + r["bytes_out"]) / r["seconds"] / 1e9
        r["ratio_to_bandwidth"] = r["gbs"] / bandwidth
        rows.append({"case": name, "GB/s": r["gbs"], "% of copy": 100 * r["ratio_to_bandwidth"],
                     "input MB": r["bytes_in"] / 1e6, "seconds": r["seconds"],
                     "peak RSS MiB": r["peak_rss_mib"],
                     "max rel diff": r.get("max_rel_diff_vs_block_mean", "")})
    if not has_esmpy:
        rows.append({"case": "xESMF", "GB/s": "esmpy not installed (conda envs only)"})
    lat, lon = grid(args.res)
    print_table(rows, ["case", "GB/s", "% of copy", "input MB", "seconds", "peak RSS MiB",
                       "max rel diff"],
                title=f"regrid {lat.size}x{lon.size} -> {lat.size // args.factor}x"
                      f"{lon.size // args.factor}, {args.steps} hourly steps (slow paths: "
                      f"{args.ref_steps}), chunks of {args.chunk}")
    streamed = cases["block-mean, streamed (dask threads)"]
    print(f"streamed: peak RSS {streamed['peak_rss_mib']:.0f} MiB = "
          f"{streamed['rss_before_mib']:.0f} MiB before the stream (interpreter, libraries and "
          f"the {streamed['pool_mib']:.0f} MiB input pool) + the preallocated "
          f"{streamed['bytes_out'] / 2**20:.0f} MiB output + chunks in flight; the year's input "
          f"is {streamed['bytes_in'] / 2**20:.0f} MiB and never resident", flush=True)
    device = torch.device("cpu")
    payload = {"args": vars(args), "grid": {"fine": [lat.size, lon.size], "lat": LAT, "lon": LON},
               "memory_bandwidth_gbs": bandwidth, "cases": cases,
               "target_ratio": 0.2}
    write_results("regrid", payload, device)
    return payload


if __name__ == "__main__":
    main()
