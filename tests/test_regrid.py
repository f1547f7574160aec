"""Conservative coarsening: exact nesting, area-mean conservation, laziness, real data."""

import numpy as np
import pytest
import xarray as xr
from downscaler.regrid import area_mean, cell_area_weights, coarsen_conservative, resolve_backend

from tests.conftest import random_fields


def block_reference(da: xr.DataArray, k: int) -> np.ndarray:
    """Exact spherical-area-weighted k x k block means."""
    w = cell_area_weights(da["lat"]).values
    x = da.values.astype("float64")
    n_lat, n_lon = x.shape[-2] // k, x.shape[-1] // k
    x = x[..., : n_lat * k, : n_lon * k] * w[: n_lat * k, None]
    sums = x.reshape(*x.shape[:-2], n_lat, k, n_lon, k).sum(axis=(-3, -1))
    return sums / (w[: n_lat * k].reshape(n_lat, k).sum(axis=1)[:, None] * k)


def test_coarsening_matches_exact_block_means_and_keeps_area_mean():
    fields, _ = random_fields(n_lat=18, n_lon=26)  # not multiples of 4: cropped first
    coarse = coarsen_conservative(fields, 4)
    assert coarse.sizes == {"time": 6, "lat": 4, "lon": 6}
    np.testing.assert_allclose(coarse["t2m"].values, block_reference(fields["t2m"], 4), rtol=1e-6)
    cropped = fields.isel(lat=slice(0, 16), lon=slice(0, 24))
    for name in ("t2m", "tp"):
        np.testing.assert_allclose(area_mean(coarse[name].astype("float64")),
                                   area_mean(cropped[name].astype("float64")), rtol=1e-6)
    np.testing.assert_allclose(coarse["lat"], cropped["lat"].values.reshape(-1, 4).mean(1))


def test_coarsening_stays_lazy_with_dask():
    fields, _ = random_fields(n_time=8)
    coarse = coarsen_conservative(fields.chunk({"time": 2}), 4)
    assert coarse["t2m"].chunks is not None
    np.testing.assert_allclose(coarse.compute()["t2m"], coarsen_conservative(fields, 4)["t2m"],
                               rtol=1e-6)


def test_area_mean_conserved_on_real_reanalysis(shared_data):
    ds = xr.open_dataset(shared_data / "eraint_uvz.nc", mask_and_scale=False)
    ds = ds.rename({"latitude": "lat", "longitude": "lon"}).sortby("lat").isel(level=0)
    fine = ds[["u", "z"]].astype("float64")
    coarse = coarsen_conservative(fine, 2)
    n_lat = fine.sizes["lat"] - fine.sizes["lat"] % 2
    cropped = fine.isel(lat=slice(0, n_lat))
    for name in ("u", "z"):
        ref = block_reference(cropped[name], 2)
        # The first coarse row holds the -90 point, whose cell the reference clips to a half
        # cell and xarray-regrid does not: compare the rows away from the pole exactly.
        np.testing.assert_allclose(coarse[name].values[:, 1:], ref[:, 1:], rtol=1e-5,
                                   atol=1e-6 * float(np.abs(ref).max()))
        np.testing.assert_allclose(area_mean(coarse[name]), area_mean(cropped[name]), rtol=1e-6)


def test_backend_choice_is_explained():
    assert resolve_backend("auto") in ("xesmf", "xarray-regrid")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend("cubic")
