"""Streaming evaluation: peak memory must not grow with the length of the test period.

For each length (--steps, then --factor times more) the script writes a synthetic test period
to netCDF chunk by chunk (fine truth, coarse input, a "model" prediction, the statistical
baselines fitted on a short training period), then runs the evaluation stage's code path
(`downscaler.evaluate.run_evaluation` on the lazily opened files: every baseline, every metric,
every figure) in a fresh spawned process and records its wall time and the rise of its peak RSS
(`common.PeakMemory`) and its absolute peak RSS (imports included). Prints a table and writes
benchmarks/results/evaluate.json (the rule
`bench_evaluate`: results/benchmarks/paper/evaluate.json).

    .venv/bin/python benchmarks/bench_evaluate.py [--steps 64] [--factors 10] [--lat 64 --lon 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PeakMemory,
    _maxrss_bytes,
    print_table,
    run_isolated,
    write_results,
)

FACTOR_K = 4  # fine cells per coarse cell along each axis
BASELINES = ["nearest", "bilinear", "bicubic", "residual_climatology", "mos"]


def _chunks(n_steps: int, n_lat: int, n_lon: int, chunk: int, seed: int, start: str):
    """(fine, coarse, prediction) time chunks of a smooth synthetic t2m + tp field."""
    rng = np.random.default_rng(seed)
    lat = 30 + 0.25 * (np.arange(n_lat) + 0.5)
    lon = -8 + 0.25 * (np.arange(n_lon) + 0.5)
    y, x = np.meshgrid(lat, lon, indexing="ij")
    pattern = 3 * np.sin(x / 2) * np.cos(y / 3)
    t_all = np.datetime64(start) + np.arange(n_steps) * np.timedelta64(6, "h")
    for t0 in range(0, n_steps, chunk):
        time_ = t_all[t0:t0 + chunk]
        n = len(time_)
        t2m = 285 + pattern + rng.normal(0, 1, (n, n_lat, n_lon))
        tp = rng.gamma(0.4, 3, (n, n_lat, n_lon))
        coords = {"time": time_, "lat": lat, "lon": lon}
        fine = xr.Dataset({"t2m": (("time", "lat", "lon"), t2m.astype("float32")),
                           "tp": (("time", "lat", "lon"), tp.astype("float32"))}, coords=coords)
        coarse = fine.coarsen(lat=FACTOR_K, lon=FACTOR_K).mean()
        pred = fine + rng.normal(0, 0.5, (n, n_lat, n_lon)).astype("float32")
        pred["tp"] = pred["tp"].clip(min=0)
        yield fine, coarse, pred


def write_case(folder: Path, n_steps: int, n_lat: int, n_lon: int, chunk: int) -> dict:
    """Write fine.nc, coarse.nc, pred.nc (test period) and fitted.nc (from a short train
    period), streaming; returns the test period's truth size in bytes."""
    from downscaler.evaluation.statistical import fit_statistical
    from downscaler.infer import write_stream

    streams = {name: [] for name in ("fine", "coarse", "pred")}

    def part(index):
        for chunk_ in _chunks(n_steps, n_lat, n_lon, chunk, 0, "2001-01-01"):
            yield chunk_[index]

    for i, name in enumerate(streams):
        write_stream(part(i), folder / f"{name}.nc")
    train = list(_chunks(64, n_lat, n_lon, 64, 1, "2000-01-01"))[0]
    fitted = fit_statistical(train[1], train[0], ["t2m", "tp"], ["t2m", "tp"], time_chunk=chunk)
    fitted.to_netcdf(folder / "fitted.nc")
    return {"truth_bytes": 2 * 4 * n_steps * n_lat * n_lon}


def evaluate_case(folder: str, chunk: int) -> dict:
    """The evaluation stage on the files in `folder` (lazy), in this (fresh) process."""
    from downscaler.evaluate import limit_netcdf_cache, run_evaluation

    limit_netcdf_cache()  # as the evaluate stage does
    torch.set_num_threads(1)
    folder = Path(folder)
    with PeakMemory(torch.device("cpu")) as peak:
        t0 = time.perf_counter()
        with (xr.open_dataset(folder / "fine.nc") as fine,
              xr.open_dataset(folder / "coarse.nc") as coarse,
              xr.open_dataset(folder / "pred.nc") as pred,
              xr.open_dataset(folder / "fitted.nc") as fitted):
            ev = run_evaluation(pred, coarse, fine, BASELINES, fitted=fitted.load(),
                                time_chunk=chunk)
            table = ev.table()
            with tempfile.TemporaryDirectory() as figs:
                ev.write_figures(figs, table)
        wall = time.perf_counter() - t0
    rmse = table[(table.method == "reslim") & (table.metric == "rmse")]
    return {"wall_s": wall, "peak_rss_rise_bytes": peak.bytes, "peak_rss_bytes": _maxrss_bytes(),
            "rmse_t2m": float(rmse[rmse.variable == "t2m"]["value"].iloc[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="test time steps of the 1x case")
    parser.add_argument("--factors", type=int, nargs="+", default=[10],
                        help="lengths of the long cases, in multiples of --steps")
    parser.add_argument("--lat", type=int, default=64, help="fine grid rows")
    parser.add_argument("--lon", type=int, default=128, help="fine grid columns")
    parser.add_argument("--time-chunk", type=int, default=32, help="evaluate.time_chunk")
    args = parser.parse_args()
    rows = []
    for mult in (1, *args.factors):
        n = args.steps * mult
        with tempfile.TemporaryDirectory() as tmp:
            size = write_case(Path(tmp), n, args.lat, args.lon, args.time_chunk)
            result = run_isolated(evaluate_case, folder=tmp, chunk=args.time_chunk)
        rows.append({"length": f"{mult}x", "test_steps": n,
                     "truth_mb": size["truth_bytes"] / 2**20,
                     "peak_rss_mb": result["peak_rss_bytes"] / 2**20,
                     "peak_rss_rise_mb": result["peak_rss_rise_bytes"] / 2**20,
                     "wall_s": result["wall_s"], "rmse_t2m": result["rmse_t2m"]})
    print_table(rows, ["length", "test_steps", "truth_mb", "peak_rss_mb", "peak_rss_rise_mb",
                       "wall_s", "rmse_t2m"],
                title=f"Streaming evaluation, {args.lat}x{args.lon} fine grid, "
                      f"{len(BASELINES)} baselines + model, time_chunk {args.time_chunk}")
    growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"peak RSS, {args.factors[-1]}x / 1x the test length: {growth:.2f}")
    write_results("evaluate", {"args": vars(args), "cases": rows, "peak_growth": growth},
                  torch.device("cpu"))


if __name__ == "__main__":
    main()
