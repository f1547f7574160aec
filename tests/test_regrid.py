"""Conservative coarsening: exact nesting, area-mean conservation, laziness, real data."""

import numpy as np
import pytest
import xarray as xr
from downscaler.regrid import (
    area_mean,
    cell_area_weights,
    coarse_grid,
    coarsen_conservative,
    normalise_grid,
    regrid,
    resolve_backend,
)

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


def global_field(res: float, n_time: int = 2, seed: int = 1, smooth: bool = False) -> xr.Dataset:
    """A global field in the raw ERA5 layout: lat descending (north first), lon 0..360."""
    lat = np.arange(90 - res / 2, -90, -res)
    lon = np.arange(res / 2, 360, res)
    if smooth:
        la, lo = np.deg2rad(lat)[:, None], np.deg2rad(lon)[None, :]
        values = np.broadcast_to(smooth_truth(la, lo), (n_time, lat.size, lon.size))
    else:
        values = 280 + 10 * np.random.default_rng(seed).normal(size=(n_time, lat.size, lon.size))
    return xr.Dataset({"t": (("time", "lat", "lon"), values.astype("float64"))},
                      coords={"time": np.arange(n_time), "lat": lat, "lon": lon})


def smooth_truth(lat_rad, lon_rad):
    """A smooth field continuous across the date line and the poles."""
    return 280 + 20 * np.cos(lat_rad) * np.sin(lon_rad) + 5 * np.sin(2 * lat_rad)


def test_normalise_grid_sorts_lat_and_wraps_lon():
    ds = normalise_grid(global_field(10.0))
    assert np.all(np.diff(ds["lat"]) > 0) and np.all(np.diff(ds["lon"]) > 0)
    assert ds["lon"].values[0] == -175 and ds["lon"].values[-1] == 175
    raw = global_field(10.0)
    np.testing.assert_array_equal(ds["t"].sel(lat=-85, lon=-175),
                                  raw["t"].sel(lat=-85, lon=185))
    # a regional grid across the date line keeps 0..360 so that it stays one piece
    pacific = xr.Dataset(coords={"lat": [0.5, 1.5], "lon": np.arange(170.5, 195, 1.0)})
    np.testing.assert_array_equal(normalise_grid(pacific)["lon"], pacific["lon"])


def test_global_coarsening_is_exact_at_the_poles_and_the_date_line():
    raw = global_field(1.0)
    coarse = coarsen_conservative(raw, 4)
    fine = normalise_grid(raw)
    assert coarse.sizes == {"time": 2, "lat": 45, "lon": 90}
    assert coarse["lon"].values[0] == -178 and coarse["lon"].values[-1] == 178
    # every coarse cell, the polar rows and the date-line columns included, is the exact
    # spherical-area block mean of its 4 x 4 fine cells
    np.testing.assert_allclose(coarse["t"].values, block_reference(fine["t"], 4), rtol=1e-12)
    np.testing.assert_allclose(area_mean(coarse["t"]), area_mean(fine["t"]), rtol=1e-12)


def test_conservative_onto_a_target_straddling_the_date_line_wraps():
    fine = normalise_grid(global_field(1.0, n_time=1))
    # 2 deg cells centred on -180, -178, ..., 178: the first spans 179..181 = -181..-179
    target = xr.Dataset(coords={"lat": np.arange(-89.0, 90, 2.0),
                                "lon": np.arange(-180.0, 180, 2.0)})
    out = regrid(fine, target, "conservative")
    assert not bool(out["t"].isnull().any())
    ref = block_reference(fine["t"].roll(lon=1, roll_coords=False), 2)  # columns (179.5, -179.5)
    np.testing.assert_allclose(out["t"].values, ref, rtol=1e-10)
    np.testing.assert_allclose(area_mean(out["t"]), area_mean(fine["t"]), rtol=1e-10)


def test_bilinear_refinement_of_a_smooth_field_is_accurate_everywhere():
    coarse = global_field(2.0, n_time=1, smooth=True)
    lat = np.arange(-89.75, 90, 0.5)
    lon = np.arange(-179.75, 180, 0.5)  # the first and last columns lie across the date line
    out = regrid(coarse, xr.Dataset(coords={"lat": lat, "lon": lon}), "bilinear")
    truth = smooth_truth(np.deg2rad(lat)[:, None], np.deg2rad(lon)[None, :])
    err = np.abs(out["t"].values[0] - truth)
    assert not np.isnan(err).any()
    # second-order accurate: |error| <= h^2/8 |f''| ~ 3e-2 K for 2 deg spacing, 20 K amplitude
    away_from_poles = np.abs(lat) < 88  # beyond the last rows the accessor pads zonal means
    assert err[away_from_poles].max() < 0.03
    assert err[away_from_poles][:, [0, -1]].max() < 0.03  # date line columns as good as the rest
    assert err.max() < 0.2
    assert out["t"].dtype == coarse["t"].dtype


def test_nearest_keeps_mask_values_and_point_methods_refuse_coarser_grids():
    mask = (global_field(2.0, n_time=1)["t"].isel(time=0) > 280).astype("float32")
    fine = xr.Dataset(coords={"lat": np.arange(-89.5, 90, 1.0), "lon": np.arange(-179.5, 180)})
    out = regrid(mask.to_dataset(name="lsm"), fine, "nearest")
    assert set(np.unique(out["lsm"].values)) <= {0.0, 1.0}
    assert out["lsm"].dtype == np.float32
    for method in ("bilinear", "nearest"):
        with pytest.raises(ValueError, match="coarser grid .* use method 'conservative'"):
            regrid(normalise_grid(global_field(1.0)), coarse_grid(
                normalise_grid(global_field(1.0)), 4), method)
    with pytest.raises(ValueError, match="method must be one of"):
        regrid(fine.assign(x=(("lat", "lon"), np.zeros((180, 360)))), fine, "cubic")


def test_nan_threshold_is_the_valid_area_fraction_by_hand():
    # 2 x 2 blocks near the equator: block A 3/4 valid, B 1/2 (one NaN per row), C 1/4, D none
    lat, lon = np.array([-0.5, 0.5]), np.array([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5])
    row = np.array([[1.0, np.nan, 2.0, np.nan, 3.0, np.nan, np.nan, np.nan],
                    [5.0, 7.0, 4.0, np.nan, np.nan, np.nan, np.nan, np.nan]])
    ds = xr.Dataset({"v": (("lat", "lon"), row)}, coords={"lat": lat, "lon": lon})

    def coarse(threshold):
        return coarsen_conservative(ds, 2, nan_threshold=threshold)["v"].values[0]

    # equal cell areas (rows symmetric about the equator): plain means of the valid cells
    np.testing.assert_allclose(coarse(0.5), [13 / 3, 3.0, np.nan, np.nan])
    np.testing.assert_allclose(coarse(0.0), [13 / 3, 3.0, 3.0, np.nan])
    np.testing.assert_allclose(coarse(0.75), [13 / 3, np.nan, np.nan, np.nan])
    np.testing.assert_allclose(coarse(1.0), [np.nan] * 4)
    with pytest.raises(ValueError, match="nan_threshold"):
        coarse(1.5)


def test_xesmf_and_xarray_regrid_agree():
    pytest.importorskip("esmpy")
    pytest.importorskip("xesmf")
    fine = global_field(1.0)
    a = coarsen_conservative(fine, 4, backend="xesmf")
    b = coarsen_conservative(fine, 4, backend="xarray-regrid")
    np.testing.assert_allclose(a["t"].values, b["t"].values, rtol=1e-6)
    smooth = global_field(2.0, n_time=1, smooth=True)
    target = xr.Dataset(coords={"lat": np.arange(-87.75, 88, 0.5),
                                "lon": np.arange(-179.75, 180, 0.5)})
    a = regrid(smooth, target, "bilinear", backend="xesmf")
    b = regrid(smooth, target, "bilinear", backend="xarray-regrid")
    np.testing.assert_allclose(a["t"].values, b["t"].values, atol=1e-6 * 280)


def test_point_methods_stay_lazy_along_time():
    coarse = global_field(4.0, n_time=4, smooth=True).chunk({"time": 2})
    target = xr.Dataset(coords={"lat": np.arange(-89, 90, 2.0), "lon": np.arange(-179, 180, 2.0)})
    for method in ("bilinear", "nearest"):
        out = regrid(coarse, target, method)
        assert out["t"].chunks[0] == (2, 2)
        np.testing.assert_allclose(out["t"].values, regrid(coarse.compute(), target, method)["t"])


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_block_mean_fast_path_equals_the_weight_matrices(threshold):
    """coarsen_conservative's direct k x k block means (backend auto) give xarray-regrid's
    conservative answer, NaN handling included, on a regional and a polar grid."""
    rng = np.random.default_rng(3)
    for south in (30.0, 82.0):  # the second reaches the pole
        lat = south + 0.25 + 0.5 * np.arange(16)
        lon = 0.25 + 0.5 * np.arange(24)
        values = rng.normal(280, 5, (3, 16, 24)).astype("float32")
        values[:, :3, :5] = np.nan
        values[1, 5, 7] = np.nan
        ds = xr.Dataset({"t2m": (("time", "lat", "lon"), values)},
                        coords={"time": np.arange(3), "lat": lat, "lon": lon})
        fast = coarsen_conservative(ds.chunk({"time": 2}), 4, "auto", threshold).compute()
        ref = coarsen_conservative(ds, 4, "xarray-regrid", threshold)
        np.testing.assert_allclose(fast["t2m"], ref["t2m"], rtol=1e-6, equal_nan=True)
        np.testing.assert_allclose(fast["lat"], ref["lat"])
        assert fast["t2m"].dtype == np.float32


def test_block_mean_kernel_matches_the_masked_reference_step_by_step(monkeypatch):
    """The one-pass kernel (weighted rows, then columns, a few steps at a time) equals the masked
    block mean; steps with NaN or inf fall back to it inside an otherwise NaN-free chunk."""
    from downscaler import regrid as rg

    monkeypatch.setattr(rg, "_BLOCK_BYTES", 2 * 12 * 16 * 4)  # two steps per inner block
    rng = np.random.default_rng(5)
    lat = 40.125 + 0.25 * np.arange(12)
    weights = cell_area_weights(xr.DataArray(lat, dims="lat", coords={"lat": lat})).values
    x = rng.normal(280, 5, (2, 5, 12, 16)).astype("float32")  # lead dims (member, time)
    x[0, 1, 0, :3] = np.nan  # one block 3/16 missing: kept at 0.5, dropped at 0.9
    x[1, 4, 5:9, 4:8] = np.nan  # a whole block missing
    x[1, 2, 7, 9] = np.inf
    for threshold in (0.5, 0.9):
        fast = rg._block_mean_array(x, weights, 4, threshold)
        ref = rg._block_mean_masked(x, weights, 4, threshold)
        assert fast.shape == (2, 5, 3, 4) and fast.dtype == np.float32
        np.testing.assert_allclose(fast, ref, rtol=1e-6, equal_nan=True)
    assert np.isnan(fast[1, 4, 1, 1]) and np.isnan(fast[0, 1, 0, 0])
    assert np.isfinite(rg._block_mean_array(x, weights, 4, 0.5)[0, 1, 0, 0])
    np.testing.assert_allclose(rg._block_mean_array(x[0, 0].astype("float64"), weights, 4, 0.5),
                               block_reference(xr.DataArray(x[0, 0], dims=("lat", "lon"),
                                                            coords={"lat": lat}), 4), rtol=1e-12)
