"""Shared fixtures: paths to the repository, ../shared data, and small synthetic datasets."""

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the repository; tests that need it skip cleanly without it."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is absent")
    return path


def random_fields(n_time=6, n_lat=16, n_lon=24, south=30.0, west=-8.0, res=0.25, seed=0):
    """Small canonical-form fields + statics with realistic magnitudes."""
    rng = np.random.default_rng(seed)
    lat = south + res / 2 + res * np.arange(n_lat)
    lon = west + res / 2 + res * np.arange(n_lon)
    time = np.array("2000-01-01", dtype="datetime64[ns]") + np.arange(n_time) * np.timedelta64(
        1, "D"
    )
    shape = (n_time, n_lat, n_lon)
    fields = xr.Dataset(
        {
            "t2m": (("time", "lat", "lon"), (280 + 5 * rng.normal(size=shape)).astype("float32")),
            "tp": (("time", "lat", "lon"), rng.gamma(0.5, 4.0, size=shape).astype("float32")),
        },
        coords={"time": time, "lat": lat, "lon": lon},
    )
    static = xr.Dataset(
        {
            "orog": (("lat", "lon"), rng.uniform(0, 2000, (n_lat, n_lon)).astype("float32")),
            "lsm": (("lat", "lon"), (rng.uniform(size=(n_lat, n_lon)) > 0.5).astype("float32")),
        },
        coords={"lat": lat, "lon": lon},
    )
    return fields, static
