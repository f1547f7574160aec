"""ERA5 request planning and conversion of CDS answers to the canonical form."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from downscaler.sources.era5 import (
    PRESSURE_LEVELS,
    SINGLE_LEVELS,
    STATIC_TARGET,
    load_era5,
    plan_era5_requests,
)
from fake_cds import Scenario, era5_answer


def config(variables, start="2000-01-01", end="2000-03-31", freq="daily", **era5) -> dict:
    return {
        "variables": variables,
        "region": {"south": 30.0, "north": 46.0, "west": -8.0, "east": 24.0},
        "period": {"start": start, "end": end},
        "frequency": freq,
        "era5": {"grid": 0.25, "max_fields_per_request": 6000, **era5},
    }


# -- planning -------------------------------------------------------------------------------------


def test_plan_splits_by_month_and_step_type():
    cfg = config(["2m_temperature", "10m_u_component_of_wind", "total_precipitation",
                  "maximum_2m_temperature_since_previous_post_processing"])
    reqs = plan_era5_requests(cfg)
    body, extra, static = reqs[:-3], reqs[-3:-1], reqs[-1]
    assert len(body) == 3 * 3  # 3 months x (instant, accum, max)
    for r in body:
        assert r.dataset == SINGLE_LEVELS
        assert len(r.request["month"]) == 1 and r.request["time"] == [f"{h:02d}:00"
                                                                     for h in range(24)]
        assert r.request["area"] == [46.0, -8.0, 30.0, 24.0]
        assert r.request["download_format"] == "unarchived"
        assert r.fields == len(r.request["variable"]) * len(r.times)
    groups = {tuple(r.request["variable"]) for r in body}
    assert groups == {("2m_temperature", "10m_u_component_of_wind"), ("total_precipitation",),
                      ("maximum_2m_temperature_since_previous_post_processing",)}
    feb = [r for r in body if r.request["month"] == ["02"]][0]
    assert len(feb.request["day"]) == 29 and len(feb.times) == 29 * 24  # leap year
    # daily output: processed variables also need 00:00 of the day after the period
    assert {tuple(r.request["variable"]) for r in extra} == {
        ("total_precipitation",), ("maximum_2m_temperature_since_previous_post_processing",)}
    assert all(r.times == ("2000-04-01T00:00",) for r in extra)
    assert static.target == STATIC_TARGET and static.variables == ("z", "lsm")
    assert static.request["variable"] == ["geopotential", "land_sea_mask"]
    assert len({r.target for r in reqs}) == len(reqs)


def test_plan_respects_field_limit():
    names = ["2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind"]
    cfg = config(names, "2000-01-01", "2000-01-31", freq="hourly", max_fields_per_request=1500)
    reqs = plan_era5_requests(cfg)[:-1]
    assert [len(r.request["variable"]) for r in reqs] == [2, 1]  # 744 fields per variable
    cfg["era5"]["max_fields_per_request"] = 500  # less than one variable-month
    reqs = plan_era5_requests(cfg)[:-1]
    assert all(len(r.request["variable"]) == 1 and r.fields <= 500 for r in reqs)
    assert sum(len(r.times) for r in reqs) == 3 * 744
    assert [len(r.request["day"]) for r in reqs[:2]] == [20, 11]


def test_plan_pressure_levels_count_levels_in_fields():
    cfg = config(["2m_temperature"], "2000-01-01", "2000-01-31", freq="hourly",
                 pressure_levels=[850, 500, 250], pressure_level_variables=["temperature",
                                                                            "geopotential"],
                 max_fields_per_request=3000)
    pl = [r for r in plan_era5_requests(cfg) if r.dataset == PRESSURE_LEVELS]
    assert all(r.fields <= 3000 for r in pl)
    assert sum(r.fields for r in pl) == 2 * 744 * 3
    assert pl[0].request["pressure_level"] == ["850", "500", "250"]


def test_plan_global_and_errors():
    cfg = config(["2m_temperature"], freq="hourly")
    cfg["region"] = None
    reqs = plan_era5_requests(cfg)
    assert all("area" not in r.request for r in reqs)
    assert not any(r.times == ("2000-04-01T00:00",) for r in reqs)  # hourly: no extra day
    with pytest.raises(ValueError, match="2m_temprature"):
        plan_era5_requests(config(["2m_temprature"]))
    with pytest.raises(ValueError, match="max_fields_per_request"):
        plan_era5_requests(config(["2m_temperature"], max_fields_per_request=10))
    with pytest.raises(ValueError, match="pressure_levels"):
        plan_era5_requests(config(["2m_temperature"], pressure_level_variables=["temperature"]))


# -- canonical form from hand-made files --------------------------------------------------------


def cds_file(path: Path, values: dict[str, np.ndarray], times: pd.DatetimeIndex,
             lat=(10.0, -10.0), lon=(0.0, 90.0, 180.0, 270.0), units=None) -> Path:
    """A netCDF in the new-CDS layout: valid_time, latitude descending, longitude 0..360."""
    units = units or {}
    ds = xr.Dataset(
        {k: (("valid_time", "latitude", "longitude"), v.astype("float32"),
             {"units": units.get(k, "K")}) for k, v in values.items()},
        coords={"valid_time": times, "latitude": list(lat), "longitude": list(lon),
                "number": 0, "expver": ("valid_time", ["0001"] * len(times))},
    )
    ds.to_netcdf(path)
    return path


def static_file(path: Path) -> Path:
    z = np.array([[[9.80665 * 100.0, -9.80665 * 20.0, 0.0, 5.0]] * 2])
    lsm = np.array([[[1.0, 1.0, 0.0, 0.5]] * 2])
    return cds_file(path, {"z": z, "lsm": lsm}, pd.DatetimeIndex(["2000-01-01"]))


def test_load_daily_by_hand(tmp_path):
    # two days; t2m varies with the hour, tp is 1 mm per hour except a 5 mm hour
    inst_t = pd.date_range("2000-01-01T00", "2000-01-02T23", freq="h")
    proc_t = pd.date_range("2000-01-01T01", "2000-01-03T00", freq="h")
    shape = (48, 2, 4)
    t2m = np.broadcast_to((270.0 + np.arange(48) % 24)[:, None, None], shape).copy()
    tp = np.full(shape, 0.001)
    tp[23] = 0.005  # valid 2000-01-02T00: the last hour of 1 January
    mx2t = t2m + 2.0
    mx2t[30] = 400.0  # valid 2000-01-02T07
    paths = [
        cds_file(tmp_path / "t.nc", {"t2m": t2m}, inst_t),
        cds_file(tmp_path / "p.nc", {"tp": tp}, proc_t, units={"tp": "m"}),
        cds_file(tmp_path / "x.nc", {"mx2t": mx2t}, proc_t),
    ]
    cfg = config(["2m_temperature", "total_precipitation",
                  "maximum_2m_temperature_since_previous_post_processing"],
                 "2000-01-01", "2000-01-02")
    fields, static = load_era5(paths, static_file(tmp_path / "s.nc"), cfg)

    assert list(fields.dims) == ["time", "lat", "lon"]
    assert list(fields.lat.values) == [-10.0, 10.0]
    assert list(fields.lon.values) == [-180.0, -90.0, 0.0, 90.0]
    assert list(fields.time.values) == list(pd.date_range("2000-01-01", periods=2).values)
    assert not {"number", "expver", "valid_time"} & set(fields.variables)
    for name, units in (("t2m", "K"), ("tp", "mm/day"), ("mx2t", "K")):
        assert fields[name].dtype == np.float32
        assert fields[name].attrs["units"] == units and fields[name].attrs["standard_name"]
    np.testing.assert_allclose(fields.t2m.values[:, 0, 0], [270 + 11.5] * 2, rtol=1e-6)
    # 1 Jan: 23 hours x 1 mm + 5 mm (valid at 2 Jan 00:00); 2 Jan: 24 x 1 mm
    np.testing.assert_allclose(fields.tp.values[:, 0, 0], [28.0, 24.0], rtol=1e-5)
    # mx2t: 1 Jan covers valid 01..24h -> max(t2m)+2 = 270+23+2; 2 Jan holds the 400 K hour
    np.testing.assert_allclose(fields.mx2t.values[:, 1, 2], [295.0, 400.0], rtol=1e-6)
    # lon 180 -> -180 moved first: the values moved with their coordinate
    assert static.orog.dims == ("lat", "lon")
    np.testing.assert_allclose(static.orog.sel(lat=10.0).values, [0.0, 5 / 9.80665, 100.0, -20.0],
                               rtol=1e-6)
    assert static.orog.attrs["units"] == "m" and float(static.lsm.max()) <= 1.0


def test_load_hourly_rate_and_incomplete_day_warning(tmp_path):
    times = pd.date_range("2000-01-01T00", "2000-01-01T23", freq="h")
    tp = np.full((24, 2, 4), 0.002)
    tp[0] = -1e-9  # GRIB packing noise
    path = cds_file(tmp_path / "p.nc", {"tp": tp}, times, units={"tp": "m"})
    cfg = config(["total_precipitation"], "2000-01-01", "2000-01-01", freq="hourly")
    fields, _ = load_era5([path], static_file(tmp_path / "s.nc"), cfg)
    assert fields.sizes["time"] == 24
    np.testing.assert_allclose(fields.tp.values[1:, 0, 0], 0.002 * 1000 * 24, rtol=1e-6)
    assert float(fields.tp.min()) == 0.0  # clipped
    cfg["frequency"] = "daily"  # valid 01..23h only: 1 January lacks its last hour
    with pytest.warns(UserWarning, match="lack some of their 24"):
        fields, _ = load_era5([path], static_file(tmp_path / "s2.nc"), cfg)
    assert np.isnan(fields.tp.values).all()


def test_expver_dimension_is_combined(tmp_path):
    times = pd.date_range("2000-01-01T00", periods=24, freq="h")
    a = np.full((2, 24, 2, 4), np.nan)
    a[0, :12] = 280.0  # ERA5 final rows
    a[1, 12:] = 290.0  # ERA5T rows
    ds = xr.Dataset(
        {"t2m": (("expver", "valid_time", "latitude", "longitude"), a, {"units": "K"})},
        coords={"expver": ["0001", "0005"], "valid_time": times, "latitude": [10.0, -10.0],
                "longitude": [0.0, 90.0, 180.0, 270.0]},
    )
    ds.to_netcdf(tmp_path / "t.nc")
    cfg = config(["2m_temperature"], "2000-01-01", "2000-01-01")
    fields, _ = load_era5([tmp_path / "t.nc"], static_file(tmp_path / "s.nc"), cfg)
    np.testing.assert_allclose(fields.t2m.values[0], 285.0)


def test_zip_answer_and_extremes_fallback(tmp_path):
    req = {"variable": ["2m_temperature", "total_precipitation"], "year": ["2000"],
           "month": ["01"], "day": ["01", "02"], "time": [f"{h:02d}:00" for h in range(24)],
           "grid": [2.0, 2.0], "area": [4.0, -2.0, 0.0, 2.0]}
    data, ctype, _ = era5_answer(SINGLE_LEVELS, req, Scenario(lon360=True))
    assert ctype == "application/zip"
    assert len(zipfile.ZipFile(io.BytesIO(data)).namelist()) == 2
    (tmp_path / "a.nc").write_bytes(data)
    cfg = config(["2m_temperature", "minimum_2m_temperature_since_previous_post_processing"],
                 "2000-01-01", "2000-01-02", freq="daily")
    with pytest.warns(UserWarning, match="mn2t is not in the ERA5 files"):
        fields, _ = load_era5([tmp_path / "a.nc"], static_file(tmp_path / "s.nc"), cfg)
    assert list(fields.data_vars) == ["t2m", "mn2t"]
    assert list(fields.lon.values) == [-2.0, 0.0, 2.0]  # 358 -> -2, sorted
    assert list(fields.lat.values) == [0.0, 2.0, 4.0]
    # fake t2m = 273.15 + 0.1 lat + 0.01 lon + hour + 0.5 day: min over a day is at hour 0
    lat, lon = 2.0, -2.0
    want = [273.15 + 0.1 * lat + 0.01 * lon + 0.5 * d for d in (1, 2)]
    np.testing.assert_allclose(fields.mn2t.sel(lat=lat, lon=lon).values, want, rtol=1e-6)
