"""Memory: the pairs stage regrids a dataset several times larger than the memory it may use.

A ~1.2 GB field (1200 daily steps of a 0.5 deg global grid, float32) is written to netCDF in
chunks, then `downscaler.cli pairs` runs in a subprocess whose address space is capped with
RLIMIT_AS to 700 MB (imports and thread reservations alone take ~400 MB of address space) and
must succeed (resident peak measured: 0.3-0.56 GB for the 1.24 GB input); its output is
checked on a subset against exact block means, and its statistics against a chunked numpy pass.
"""

import json
import os
import subprocess
import sys

import dask.array as dask_array
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from tests.conftest import REPO
from tests.test_regrid import block_reference

N_TIME, RES, FACTOR = 1200, 0.5, 4
CAP_MB = 700  # address space of the child: python + numpy + xarray + dask + HDF5 + data

CHILD = """
import resource, sys, threading
threading.stack_size(4 << 20)  # dask's worker threads: 4 MB stacks, not 8, of address space
cap = int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from downscaler.cli import main
rc = main(sys.argv[2:])
# VmHWM is this address space's peak; ru_maxrss would also count the forking parent's
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) // 1024
print(f"peak_rss_mb={peak}")
sys.exit(rc)
"""


def write_big_input(folder) -> tuple[str, str, float]:
    """Write fields.nc (dask-generated, chunk by chunk) and static.nc; return paths and GB."""
    lat = np.arange(-90 + RES / 2, 90, RES)
    lon = np.arange(-180 + RES / 2, 180, RES)
    time = pd.date_range("2000-01-01", periods=N_TIME, freq="D")
    def noise(block_info=None):  # float32 uniform noise, seeded per block: cheap to make
        loc = block_info[None]
        rng = np.random.default_rng(loc["chunk-location"][0])
        return 270 + 20 * rng.random(loc["chunk-shape"], dtype="float32")

    t2m = dask_array.map_blocks(noise, chunks=((50,) * (N_TIME // 50), lat.size, lon.size),
                                dtype="float32")
    coords = {"time": time, "lat": lat, "lon": lon}
    fields = xr.Dataset({"t2m": (("time", "lat", "lon"), t2m)}, coords=coords)
    static = xr.Dataset(
        {"orog": (("lat", "lon"), np.zeros((lat.size, lon.size), "float32")),
         "lsm": (("lat", "lon"), np.ones((lat.size, lon.size), "float32"))},
        coords={"lat": lat, "lon": lon},
    )
    paths = str(folder / "fields.nc"), str(folder / "static.nc")
    fields.to_netcdf(paths[0])
    static.to_netcdf(paths[1])
    return (*paths, fields["t2m"].nbytes / 1e9)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS caps the address space on Linux")
def test_pairs_stage_regrids_data_larger_than_its_memory_cap(tmp_path):
    fields_path, static_path, gigabytes = write_big_input(tmp_path)
    config = {
        "targets": {"variables": ["2m_temperature"]},
        "inputs": {"variables": ["2m_temperature"], "calendar": False},
        "frequency": "daily",
        "statics": ["orography", "land_sea_mask", "latitude"],
        "regrid": {"factor": FACTOR, "backend": "xarray-regrid", "time_chunk": 8,
                   "nan_threshold": 0.5, "scheduler": "threads"},
        "split": {"train": {"start": "2000-01-01", "end": "2002-12-31"},
                  "val": {"start": "2003-01-01", "end": "2003-02-28"},
                  "test": {"start": "2003-03-01", "end": "2003-04-14"}},
    }
    out = {name: str(tmp_path / name) for name in ("fine.nc", "coarse.nc", "stats.json")}
    argv = ["pairs", "--config", json.dumps(config), "--fields", fields_path, "--inputs", "none",
            "--static", static_path, "--fine", out["fine.nc"], "--coarse", out["coarse.nc"],
            "--stats", out["stats.json"]]
    # one malloc arena, one BLAS thread: their reservations count against RLIMIT_AS
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1", "DASK_NUM_WORKERS": "2", "DOWNSCALER_DEBUG": "1"}
    result = subprocess.run([sys.executable, "-c", CHILD, str(CAP_MB), *argv], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    peak_mb = int(result.stdout.split("peak_rss_mb=")[1].split()[0])
    # the address-space cap is the bound; resident peak measured 0.3-0.56 GB on 2 busy cores
    assert peak_mb < CAP_MB < gigabytes * 1e3 / 1.7, (peak_mb, gigabytes)

    with xr.open_dataset(fields_path) as fields, xr.open_dataset(out["coarse.nc"]) as coarse:
        assert coarse.sizes == {"time": N_TIME, "lat": 90, "lon": 180}
        for t in (0, 517, N_TIME - 1):  # a checked subset: exact spherical-area block means
            ref = block_reference(fields["t2m"].isel(time=t).astype("float64"), FACTOR)
            np.testing.assert_allclose(coarse["t2m"].values[t], ref, rtol=2e-6)
        train = fields["t2m"].sel(time=slice("2000-01-01", "2002-12-31"))
        total = total_sq = count = 0.0
        for t0 in range(0, train.sizes["time"], 100):  # chunked numpy pass, float64
            block = train.isel(time=slice(t0, t0 + 100)).values.astype("float64")
            total, total_sq, count = total + block.sum(), total_sq + (block**2).sum(), \
                count + block.size
    stats = json.loads((tmp_path / "stats.json").read_text())
    mean = total / count
    np.testing.assert_allclose(stats["t2m"]["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(stats["t2m"]["std"], np.sqrt(total_sq / count - mean**2),
                               rtol=1e-6)
    with xr.open_dataset(out["fine.nc"]) as fine:
        assert fine.sizes == {"time": N_TIME, "lat": 360, "lon": 720}
        assert set(fine.data_vars) == {"t2m", "orog", "lsm", "latitude"}
