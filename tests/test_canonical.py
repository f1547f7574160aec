"""Canonical form and the `local` source: real on-disk layouts written in tmp_path."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from downscaler.io import write_netcdf
from downscaler.sources.canonical import G0, canonicalize, split_statics
from downscaler.sources.local import open_local

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LAT = np.array([90.0, 45.0, 0.0, -45.0, -90.0])  # new-CDS order: descending
LON = np.arange(0.0, 360.0, 0.25)  # new-CDS global 0..359.75


def new_cds(times: pd.DatetimeIndex, seed: int = 0, levels: bool = True) -> xr.Dataset:
    """A dataset laid out like a new-CDS netCDF answer (valid_time, number, expver, ...)."""
    rng = np.random.default_rng(seed)
    shape = (len(times), LAT.size, LON.size)
    data = {
        "t2m": (("valid_time", "latitude", "longitude"),
                (270 + 20 * rng.random(shape)).astype("f4"),
                {"units": "K", "long_name": "2 metre temperature", "GRIB_units": "K"}),
        "tp": (("valid_time", "latitude", "longitude"),
               (0.001 * rng.random(shape)).astype("f4"),
               {"units": "m", "long_name": "Total precipitation"}),
    }
    coords = {
        "valid_time": times, "latitude": LAT, "longitude": LON, "number": 0,
        "expver": ("valid_time", np.array(["0001"] * len(times))),
    }
    if levels:
        data["t"] = (("valid_time", "pressure_level", "latitude", "longitude"),
                     (250 + rng.random((len(times), 2, LAT.size, LON.size))).astype("f4"),
                     {"units": "K"})
        coords["pressure_level"] = ("pressure_level", [500.0, 850.0], {"units": "hPa"})
    return xr.Dataset(data, coords=coords)


def test_new_cds_netcdf_to_canonical(tmp_path):
    times = pd.date_range("2001-01-01", periods=3, freq="h")
    raw = new_cds(times)
    raw.to_netcdf(tmp_path / "era5.nc")
    fields, static = open_local(tmp_path / "era5.nc",
                                ["2m_temperature", "total_precipitation"])

    assert set(fields.data_vars) == {"t2m", "tp"}  # selection keeps only what was asked
    assert fields["t2m"].dims == ("time", "lat", "lon")
    assert np.all(np.diff(fields["lat"]) > 0) and fields["lat"][0] == -90
    lon = fields["lon"].values
    assert lon[0] == -180.0 and lon[-1] == 179.75 and lon.size == 1440  # wrap kept, no crop
    assert np.all(np.diff(lon) > 0)
    assert fields["time"].dtype == np.dtype("datetime64[ns]")
    assert list(pd.DatetimeIndex(fields["time"].values)) == list(times)
    assert not {"number", "expver", "valid_time", "latitude"} & set(fields.variables)
    assert fields["t2m"].dtype == np.float32 and fields["tp"].dtype == np.float32

    # value at lon 350 / lat 45 (row 1 of the descending file) lands at lon -10 / lat 45
    i350 = int(np.where(LON == 350.0)[0][0])
    got = fields["t2m"].sel(lat=45.0, lon=-10.0).values
    np.testing.assert_array_equal(got, raw["t2m"].values[:, 1, i350])
    # tp: metres per hour -> mm/day, by hand: 1000 mm/m * 24 h/day
    got_tp = fields["tp"].sel(lat=-90.0, lon=179.75).values
    want = raw["tp"].values[:, 4, 719].astype("f8") * 1000 * 24  # lon 179.75 is index 719
    np.testing.assert_allclose(got_tp, want, rtol=1e-6)

    assert fields["tp"].attrs["units"] == "mm/day"
    assert fields["t2m"].attrs["standard_name"] == "air_temperature"
    assert "GRIB_units" not in fields["t2m"].attrs
    assert fields["lat"].attrs["units"] == "degrees_north"
    assert fields["lon"].attrs["standard_name"] == "longitude"
    assert len(static.data_vars) == 0
    # canonical output writes cleanly (no stale packing/calendar encodings) and reads back
    write_netcdf(fields, tmp_path / "raw" / "fields.nc")
    back = xr.open_dataset(tmp_path / "raw" / "fields.nc")
    xr.testing.assert_allclose(back.load(), fields.load())


def test_pressure_levels_are_kept_in_hpa(tmp_path):
    raw = new_cds(pd.date_range("2001-01-01", periods=2, freq="6h"))
    raw = raw.assign_coords(pressure_level=("pressure_level", [50000.0, 85000.0],
                                            {"units": "Pa"})).rename(pressure_level="plev")
    ds = canonicalize(raw)
    assert ds["t"].dims == ("time", "level", "lat", "lon")
    assert list(ds["level"].values) == [500, 850]
    assert ds["level"].attrs["units"] == "hPa"


def test_zip_of_stepType_members_is_merged(tmp_path):
    times = pd.date_range("2001-02-01", periods=2, freq="h")
    full = new_cds(times, levels=False)
    inst = full[["t2m"]]
    accum = full[["tp"]]
    inst.to_netcdf(tmp_path / "data_stream-oper_stepType-instant.nc")
    accum.to_netcdf(tmp_path / "data_stream-oper_stepType-accum.nc")
    archive = tmp_path / "answer.nc"  # the CDS names it .nc even when it is a zip
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("data_stream-oper_stepType-instant.nc", "data_stream-oper_stepType-accum.nc"):
            zf.write(tmp_path / name, arcname=name)
            (tmp_path / name).unlink()
    fields, _ = open_local(archive)
    assert set(fields.data_vars) == {"t2m", "tp"}
    assert fields.sizes == {"time": 2, "lat": 5, "lon": 1440}
    np.testing.assert_allclose(fields["tp"].sel(lat=0.0, lon=0.0).values,
                               full["tp"].values[:, 2, 0] * 24000.0, rtol=1e-6)
    # re-opening reuses the extraction and gives the same answer
    again, _ = open_local(archive)
    xr.testing.assert_identical(again.load(), fields.load())


@pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")
def test_zarr_store(tmp_path):
    raw = new_cds(pd.date_range("2001-01-01", periods=2, freq="D"), levels=False)
    raw.drop_vars("expver").to_zarr(tmp_path / "era5.zarr")
    fields, _ = open_local(str(tmp_path / "era5.zarr"), ["2m_temperature"])
    assert list(fields.data_vars) == ["t2m"]
    np.testing.assert_array_equal(fields["t2m"].sel(lat=90.0).values[:, 0],
                                  raw["t2m"].values[:, 0, 720])  # lon 180 -> -180 first


def test_glob_concatenates_in_time_and_merges_statics(tmp_path):
    months = [pd.date_range(f"2001-{m:02d}-01", periods=2, freq="D") for m in (3, 1, 2)]
    for i, times in enumerate(months):
        ds = new_cds(times, seed=i, levels=False)
        # ERA5 answers time-invariant z/lsm with the requested time steps
        ds["z"] = xr.full_like(ds["t2m"], 100.0 * G0).assign_attrs(units="m**2 s**-2")
        ds["lsm"] = xr.full_like(ds["t2m"], 0.5).assign_attrs(units="(0 - 1)")
        ds.to_netcdf(tmp_path / f"era5_{times[0]:%Y%m}.nc")
    fields, static = open_local(str(tmp_path / "era5_*.nc"),
                                ["2m_temperature", "orography", "land_sea_mask"])
    assert fields.sizes["time"] == 6
    assert pd.DatetimeIndex(fields["time"].values).is_monotonic_increasing
    assert set(fields.data_vars) == {"t2m"}
    assert set(static.data_vars) == {"orog", "lsm"}
    assert static["orog"].dims == ("lat", "lon")
    np.testing.assert_allclose(static["orog"].values, 100.0, rtol=1e-6)
    assert static["orog"].attrs["units"] == "m"
    np.testing.assert_allclose(static["lsm"].values, 0.5)


def test_files_split_by_variable_are_merged(tmp_path):
    raw = new_cds(pd.date_range("2001-01-01", periods=2, freq="D"), levels=False)
    raw[["t2m"]].to_netcdf(tmp_path / "t2m.nc")
    raw[["tp"]].to_netcdf(tmp_path / "tp.nc")
    fields, _ = open_local([tmp_path / "t2m.nc", tmp_path / "tp.nc"])
    assert set(fields.data_vars) == {"t2m", "tp"} and fields.sizes["time"] == 2


@pytest.mark.parametrize(
    ("name", "units", "value", "short", "expected"),
    [
        ("tas", "degC", 10.0, "t2m", 283.15),
        ("t2m", "K", 283.0, "t2m", 283.0),
        ("pr", "kg m-2 s-1", 1.0e-4, "tp", 8.64),
        ("tp", "m", 0.002, "tp", 48.0),
        ("uas", "m s**-1", 3.0, "u10", 3.0),
        ("10v", "km/h", 36.0, "v10", 10.0),
        ("tasmax", "K", 300.0, "mx2t", 300.0),
        ("mn2t", "degC", -5.0, "mn2t", 268.15),
    ],
)
def test_unit_conversions(name, units, value, short, expected):
    ds = xr.Dataset(
        {name: (("time", "lat", "lon"), np.full((1, 2, 3), value), {"units": units})},
        coords={"time": [np.datetime64("2000-01-01")], "lat": [0.0, 1.0],
                "lon": [0.0, 1.0, 2.0]},
    )
    out = canonicalize(ds)
    assert list(out.data_vars) == [short]
    np.testing.assert_allclose(out[short].values, expected, rtol=1e-6)
    assert out[short].dtype == np.float32


def test_static_conversions_sftlf_percent_and_geopotential():
    coords = {"lat": [0.0, 1.0], "lon": [10.0, 20.0]}
    ds = xr.Dataset({
        "sftlf": (("lat", "lon"), [[0.0, 25.0], [100.0, 50.0]], {"units": "%"}),
        "z": (("lat", "lon"), [[0.0, G0 * 1000], [G0 * 10, G0]], {"units": "m**2 s**-2"}),
    }, coords=coords)
    fields, static = split_statics(canonicalize(ds))
    np.testing.assert_allclose(static["lsm"].values, [[0.0, 0.25], [1.0, 0.5]])
    np.testing.assert_allclose(static["orog"].values, [[0.0, 1000.0], [10.0, 1.0]], rtol=1e-6)
    assert static["lsm"].attrs["standard_name"] == "land_binary_mask"
    assert len(fields.data_vars) == 0


def test_ambiguous_or_unknown_units_are_errors():
    ds = xr.Dataset({"tp": (("lat", "lon"), [[1.0]], {"units": "mm"})},
                    coords={"lat": [0.0], "lon": [0.0]})
    with pytest.raises(ValueError, match="ambiguous"):
        canonicalize(ds)
    ds["tp"].attrs["units"] = "furlongs"
    with pytest.raises(ValueError, match="'tp'.*furlongs"):
        canonicalize(ds)


def test_old_cds_expver_rows_are_combined():
    times = pd.date_range("2024-01-01", periods=4, freq="D")
    era5 = np.array([1.0, 2.0, np.nan, np.nan])  # ERA5 final
    era5t = np.array([np.nan, np.nan, 3.0, 4.0])  # ERA5T preliminary
    data = np.stack([era5, era5t], axis=1)[:, :, None, None] + 273.0
    ds = xr.Dataset(
        {"t2m": (("time", "expver", "latitude", "longitude"), data, {"units": "K"})},
        coords={"time": times, "expver": [1, 5], "latitude": [0.0], "longitude": [0.0]},
    )
    out = canonicalize(ds)
    assert "expver" not in out.variables
    np.testing.assert_allclose(out["t2m"].values.ravel(), [274.0, 275.0, 276.0, 277.0])


def test_cfgrib_forecast_layout_is_stacked_to_valid_times():
    # cfgrib gives accumulations as reference time x step with a 2-D valid_time
    ref = pd.to_datetime(["2001-01-01T06", "2001-01-01T18"])
    steps = pd.to_timedelta([1, 2], unit="h")
    tp = np.arange(4.0).reshape(2, 2, 1, 1) * 0.001
    ds = xr.Dataset(
        {"tp": (("time", "step", "latitude", "longitude"), tp, {"units": "m"})},
        coords={"time": ref, "step": steps, "latitude": [10.0], "longitude": [20.0],
                "valid_time": (("time", "step"), ref.values[:, None] + steps.values[None]),
                "surface": 0.0, "number": 0},
    )
    out = canonicalize(ds)
    want = pd.to_datetime(["2001-01-01T07", "2001-01-01T08", "2001-01-01T19",
                           "2001-01-01T20"])
    assert list(pd.DatetimeIndex(out["time"].values)) == list(want)
    np.testing.assert_allclose(out["tp"].values.ravel(), [0.0, 24.0, 48.0, 72.0])


def test_canonicalize_is_idempotent():
    raw = new_cds(pd.date_range("2001-01-01", periods=2, freq="h"))
    once = canonicalize(raw)
    xr.testing.assert_identical(canonicalize(once), once)


def test_grib_via_cfgrib(tmp_path):
    import eccodes  # pinned with cfgrib in envs/requirements.txt

    path = tmp_path / "era5.grib"
    with open(path, "wb") as fh:
        for hour in (0, 6):
            h = eccodes.codes_grib_new_from_samples("regular_ll_sfc_grib2")
            for key, val in dict(
                Ni=4, Nj=3, latitudeOfFirstGridPointInDegrees=10.0,
                longitudeOfFirstGridPointInDegrees=0.0,
                latitudeOfLastGridPointInDegrees=-10.0,
                longitudeOfLastGridPointInDegrees=270.0,
                iDirectionIncrementInDegrees=90.0, jDirectionIncrementInDegrees=10.0,
                dataDate=20000101, dataTime=hour * 100, shortName="2t",
            ).items():
                eccodes.codes_set(h, key, val)
            eccodes.codes_set_values(h, np.arange(12.0) + 273.0 + hour)
            eccodes.codes_write(h, fh)
            eccodes.codes_release(h)
    fields, _ = open_local(path, ["2m_temperature"])
    assert list(pd.DatetimeIndex(fields["time"].values).hour) == [0, 6]
    assert list(fields["lon"].values) == [-180.0, -90.0, 0.0, 90.0]
    # GRIB row 0 is lat 10; its column at lon 270 is value 3 (+ 273 + 6 at 06 UTC)
    assert float(fields["t2m"].sel(lat=10.0, lon=-90.0).isel(time=1)) == pytest.approx(282.0)
    assert not list(tmp_path.glob("*.idx"))  # no index files written beside the data


def test_error_names_the_pattern_and_the_files_variables(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here_"):
        open_local(str(tmp_path / "nothing_here_*.nc"))
    with pytest.raises(FileNotFoundError, match="missing.nc"):
        open_local(tmp_path / "missing.nc")
    new_cds(pd.date_range("2001-01-01", periods=1), levels=False).to_netcdf(tmp_path / "a.nc")
    with pytest.raises(KeyError, match=r"a\.nc.*u10.*'t2m', 'tp'"):
        open_local(tmp_path / "a.nc", ["10m_u_component_of_wind"])
    (tmp_path / "broken.nc").write_text("<html>503 Service Unavailable</html>")
    with pytest.raises(ValueError, match="broken.nc"):
        open_local(tmp_path / "broken.nc")


def test_split_statics_without_time():
    ds = xr.Dataset(
        {"t2m": (("time", "lat", "lon"), np.ones((2, 1, 1)), {"units": "K"}),
         "orog": (("lat", "lon"), [[5.0]], {"units": "m"})},
        coords={"time": pd.date_range("2000-01-01", periods=2), "lat": [0.0], "lon": [0.0]},
    )
    fields, static = split_statics(canonicalize(ds))
    assert list(fields.data_vars) == ["t2m"] and list(static.data_vars) == ["orog"]
    assert "time" not in static.dims


def test_era_interim_pressure_levels():
    path = SHARED / "data" / "eraint_uvz.nc"
    if not path.exists():
        pytest.skip(f"{path} not available (needs the shared data folder)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the file's NaN _FillValue on float64 is harmless
        raw = xr.open_dataset(path)
    out = canonicalize(raw)
    assert out["z"].dims[-2:] == ("lat", "lon") and "level" in out["z"].dims
    assert list(out["level"].values) == [200, 500, 850]
    assert np.all(np.diff(out["lat"]) > 0) and out["lat"][0] == -90.0
    assert out["lon"][0] == -180.0 and np.all(np.diff(out["lon"]) > 0)
    # geopotential on levels stays `z` (m2 s-2), it is not orography
    assert "orog" not in out and out["z"].attrs["units"] == "m2 s-2"
    assert out["u"].attrs["units"] == "m/s"
    np.testing.assert_array_equal(
        out["z"].sel(level=500, lat=60.0, lon=-30.0).values,
        raw["z"].sel(level=500, latitude=60.0, longitude=-30.0).values.astype("f4"),
    )



def test_grib_without_cfgrib_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cfgrib", None)  # as if not installed
    path = tmp_path / "era5.grib"
    path.write_bytes(b"GRIB" + b"\0" * 60)
    with pytest.raises(ImportError, match=r"era5\.grib.*pip install cfgrib eccodes"):
        open_local(path)


def test_era_interim_pressure_levels_as_inputs_through_the_local_path(tmp_path):
    """Real ERA-Interim u, v, z on pressure levels (0.75 deg) as `inputs` (local files): picked
    by `name@hPa`, then conservatively onto a 1-degree coarse grid nested in a 0.25 target grid."""
    path = SHARED / "data" / "eraint_uvz.nc"
    if not path.exists():
        pytest.skip(f"{path} not available (needs the shared data folder)")
    from downscaler.pairs import inputs_on_grid
    from downscaler.sources.prepare import load_inputs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the file's NaN _FillValue on float64 is harmless
        raw = xr.open_dataset(path).load()
    # monthly climatology (Jan, Jul) -> two dated time steps, as a user's file would have
    dated = raw.rename(month="time").assign_coords(
        time=pd.to_datetime(["2000-01-01", "2000-01-02"]))
    dated.to_netcdf(tmp_path / "eraint.nc")
    region = {"south": 40.0, "north": 48.0, "west": 0.0, "east": 16.0}
    config = {"inputs": {"source": "local", "resolution": 0.75,
                         "paths": [str(tmp_path / "eraint.nc")],
                         "variables": ["geopotential@500", "u_component_of_wind@850"]},
              "targets": {"resolution": 0.25}, "region": region, "seed": 0,
              "period": {"start": "2000-01-01", "end": "2000-01-02"}, "frequency": "daily",
              "coverage": "error"}
    fields = load_inputs(config, tmp_path / "raw")
    assert list(fields.data_vars) == ["z500", "u850"]
    np.testing.assert_array_equal(
        fields["z500"].sel(lat=45.0, lon=6.0).values,
        raw["z"].sel(level=500, latitude=45.0, longitude=6.0).values.astype("f4"))
    assert fields["z500"].attrs["units"] == "m2 s-2"
    lat = 40.5 + np.arange(8.0)
    lon = 0.5 + np.arange(16.0)
    grid = xr.Dataset(coords={"lat": lat, "lon": lon})
    coarse = inputs_on_grid(fields, grid, fields["time"].values, "auto", 0.5)
    assert coarse["z500"].shape == (2, 8, 16) and bool(np.isfinite(coarse["z500"]).all())
    # conservative: the mean over the domain is kept (to the edge cells' partial overlaps)
    inner = fields["z500"].sel(lat=slice(40, 48), lon=slice(0, 16)).mean()
    assert float(coarse["z500"].mean()) == pytest.approx(float(inner), rel=2e-3)
    config["inputs"]["variables"] = ["geopotential@700"]
    with pytest.raises(KeyError, match=r"level 700 hPa but z has levels \[200, 500, 850\]"):
        load_inputs(config, tmp_path / "raw")
