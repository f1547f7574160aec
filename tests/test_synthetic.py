"""Tests of the synthetic source: canonical form, determinism, and the physics the demo relies on
(lapse-rate detail predictable from orography, noise that is not, windward rain, diurnal and
seasonal cycles), plus clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from downscaler import io
from downscaler.sources import synthetic
from downscaler.variables import BY_SHORT_NAME, VARIABLES

ALL = list(VARIABLES)
# Mid-latitude Europe/North Atlantic-like box under the westerlies: 32 x 64 cells at 1 degree.
REGION = {"south": 30.0, "north": 62.0, "west": -20.0, "east": 44.0}
RES = 1.0


@pytest.fixture(scope="module")
def daily() -> tuple[xr.Dataset, xr.Dataset]:
    return synthetic.generate(ALL, REGION, RES, "2001-01-01", "2001-03-01", seed=3)


@pytest.fixture(scope="module")
def hourly() -> tuple[xr.Dataset, xr.Dataset]:
    return synthetic.generate(
        ["2m_temperature", *ALL[4:]], REGION, RES, "2001-06-01", "2001-06-04", "hourly", seed=3
    )


def _fine(a: np.ndarray, b: int = 4) -> np.ndarray:
    """Field minus its b x b block mean (the detail a b-times coarser grid cannot hold)."""
    *lead, ny, nx = a.shape
    r = a.reshape(*lead, ny // b, b, nx // b, b)
    return (r - r.mean(axis=(-3, -1), keepdims=True)).reshape(a.shape)


# ------------------------------------------------------------------ canonical form


def test_canonical_form(daily):
    fields, static = daily
    assert list(fields.data_vars) == ["t2m", "tp", "u10", "v10", "mn2t", "mx2t"]
    assert dict(fields.sizes) == {"time": 60, "lat": 32, "lon": 64}
    for name, var in fields.data_vars.items():
        assert var.dims == ("time", "lat", "lon")
        assert var.dtype == np.float32
        reg = BY_SHORT_NAME[name]
        assert var.attrs == {
            "units": reg.units,
            "standard_name": reg.standard_name,
            "long_name": reg.long_name,
        }
        assert np.isfinite(var.values).all()
    for name in ("orog", "lsm"):
        assert static[name].dims == ("lat", "lon") and static[name].dtype == np.float32
        assert static[name].attrs["units"] == BY_SHORT_NAME[name].units
        assert static[name].attrs["standard_name"] == BY_SHORT_NAME[name].standard_name
    # Cell-centred, ascending coordinates with CF attributes.
    np.testing.assert_allclose(fields.lat, 30.5 + np.arange(32))
    np.testing.assert_allclose(fields.lon, -19.5 + np.arange(64))
    np.testing.assert_array_equal(fields.lat, static.lat)
    assert fields.lat.attrs["units"] == "degrees_north" and fields.lat.attrs["axis"] == "Y"
    assert fields.lon.attrs["standard_name"] == "longitude" and fields.lon.attrs["axis"] == "X"
    assert fields.time.attrs["standard_name"] == "time" and fields.time.attrs["axis"] == "T"
    assert fields.time.encoding["units"].startswith("hours since")
    times = fields.time.values
    assert times.dtype.kind == "M"
    assert times[0] == np.datetime64("2001-01-01") and times[-1] == np.datetime64("2001-03-01")
    assert (np.diff(times) == np.timedelta64(1, "D")).all()
    assert fields.attrs["source"] == "synthetic" and fields.attrs["seed"] == 3
    assert fields.attrs["frequency"] == "daily" and fields.attrs["resolution"] == 1.0


def test_netcdf_round_trip(daily, tmp_path):
    fields, static = daily
    io.write_netcdf(fields.isel(time=slice(0, 3)), tmp_path / "f.nc")
    back = xr.open_dataset(tmp_path / "f.nc")
    np.testing.assert_array_equal(back.time.values, fields.time.values[:3])
    np.testing.assert_array_equal(back.t2m.values, fields.t2m.values[:3])
    assert back.tp.attrs["units"] == "mm/day"


def test_statics(daily):
    _, static = daily
    orog, lsm = static.orog.values, static.lsm.values
    land = lsm > 0.5
    assert (orog >= 0).all() and (orog[~land] == 0).all() and (orog[land] > 0).all()
    assert lsm.min() >= 0 and lsm.max() <= 1
    assert 0.4 <= land.mean() <= 0.7
    assert 2000 <= orog.max() <= 3000
    # Real sub-grid relief: the detail that a 4x coarser grid cannot hold.
    sub = _fine(orog)
    assert 80 < np.sqrt((sub[land] ** 2).mean()) < 400


# ------------------------------------------------------------------ determinism


def test_deterministic_and_seeded(daily):
    fields, static = daily
    again, static2 = synthetic.generate(ALL, REGION, RES, "2001-01-01", "2001-03-01", seed=3)
    for name in fields.data_vars:
        np.testing.assert_array_equal(fields[name].values, again[name].values)
    np.testing.assert_array_equal(static.orog.values, static2.orog.values)
    other, static3 = synthetic.generate(ALL, REGION, RES, "2001-01-01", "2001-03-01", seed=4)
    assert not np.array_equal(static.orog.values, static3.orog.values)
    for name in fields.data_vars:
        assert not np.array_equal(fields[name].values, other[name].values)


def test_fields_independent_of_other_variables_and_chunking(daily, monkeypatch):
    fields, _ = daily
    monkeypatch.setattr(synthetic, "CHUNK_CELLS", 32 * 64 * 7)  # 7 steps per chunk
    alone, _ = synthetic.generate(
        ["total_precipitation", "2m_temperature"], REGION, RES, "2001-01-01", "2001-03-01", seed=3
    )
    np.testing.assert_array_equal(alone.t2m.values, fields.t2m.values)
    np.testing.assert_array_equal(alone.tp.values, fields.tp.values)


# ------------------------------------------------------------------ physics


def test_precipitation_is_intermittent_with_a_heavy_tail(daily):
    tp = daily[0].tp.values
    assert (tp >= 0).all()
    assert 0.3 <= (tp == 0).mean() <= 0.8
    assert 0.5 < tp.mean() < 10
    assert np.percentile(tp, 99.9) > 20


def test_temperature_range_and_extremes(daily):
    fields, _ = daily
    t2m = fields.t2m.values
    assert 200 < t2m.min() and t2m.max() < 330
    assert (fields.mn2t.values < t2m).all() and (t2m < fields.mx2t.values).all()
    assert 1 < float((fields.mx2t - fields.mn2t).mean()) < 15


def test_fine_scale_temperature_follows_lapse_rate_but_not_only():
    # 0.25 degrees (32 x 64): a 4x4 block is ~100 km, where the lapse rate dominates the detail.
    region = {"south": 44.0, "north": 52.0, "west": 0.0, "east": 16.0}
    fields, static = synthetic.generate(
        ["2m_temperature"], region, 0.25, "2001-01-01", "2001-03-01", seed=3
    )
    land = static.lsm.values > 0.5
    h = np.broadcast_to(_fine(static.orog.values.astype(np.float64)), fields.t2m.shape)[:, land]
    t = _fine(fields.t2m.values.astype(np.float64))[:, land]
    r = np.corrcoef(h.ravel(), t.ravel())[0, 1]
    assert r < -0.5
    slope = (h * t).sum() / (h * h).sum()
    assert -7.5e-3 < slope < -5.5e-3  # the 6.5 K/km lapse rate
    residual = t - slope * h
    assert 0.05 < residual.var() < 1.0  # unpredictable fine-scale detail remains (K^2)
    # ...and it changes from day to day, unlike anything a static field could explain.
    assert np.abs(residual[1:] - residual[:-1]).mean() > 0.1


def test_windward_slopes_are_wetter(daily):
    fields, static = daily
    lat = np.deg2rad(fields.lat.values)[:, None]
    orog = static.orog.values.astype(np.float64)
    dh_dy = np.gradient(orog, axis=0) / (6.371e6 * np.deg2rad(RES))
    dh_dx = np.gradient(orog, axis=1) / (6.371e6 * np.deg2rad(RES) * np.cos(lat))
    u, v = float(fields.u10.mean()), float(fields.v10.mean())
    assert u > 2  # westerlies
    upslope = u * dh_dx + v * dh_dy
    slope = (static.lsm.values > 0.5) & (np.abs(upslope) > np.median(np.abs(upslope)))
    tp = fields.tp.values.mean(axis=0)
    windward = tp[slope & (upslope > 0)].mean()
    lee = tp[slope & (upslope < 0)].mean()
    assert windward > 1.1 * lee


def test_wind_is_slower_over_land_and_rough_terrain(daily):
    fields, static = daily
    speed = np.hypot(fields.u10.values, fields.v10.values).mean(axis=0)
    orog = static.orog.values
    sea = static.lsm.values < 0.5
    high = orog > np.percentile(orog[~sea], 75)
    assert speed[high].mean() < speed[sea].mean()


def test_seasonal_cycle_has_hemisphere_sign():
    year = ("2001-01-01", "2001-12-31")
    for south, sign in ((40.0, 1), (-48.0, -1)):
        region = {"south": south, "north": south + 8, "west": 0.0, "east": 16.0}
        fields, _ = synthetic.generate(["2m_temperature"], region, 2.0, *year, seed=1)
        monthly = fields.t2m.mean(("lat", "lon")).groupby("time.month").mean()
        summer_minus_winter = float(monthly.sel(month=7) - monthly.sel(month=1))
        assert sign * summer_minus_winter > 3


def test_hourly_has_steps_and_a_diurnal_cycle(hourly):
    fields, static = hourly
    assert fields.sizes["time"] == 4 * 24
    assert fields.time.values[-1] == np.datetime64("2001-06-04T23:00")
    assert (np.diff(fields.time.values) == np.timedelta64(1, "h")).all()
    land = static.lsm.values > 0.5
    # Composite by UTC hour over land; 12 degrees E mean longitude: local time = UTC + 0.8 h.
    cycle = fields.t2m.values[:, land].mean(axis=1).reshape(4, 24).mean(axis=0)
    assert cycle.max() - cycle.min() > 2
    assert 11 <= int(np.argmax(cycle)) <= 16 and int(np.argmin(cycle)) <= 5
    t2m = fields.t2m.values
    assert (fields.mn2t.values < t2m).all() and (t2m < fields.mx2t.values).all()


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variables": ["2m_temprature"]}, "valid choices.*2m_temperature"),
        ({"variables": []}, "variables is empty"),
        ({"region": {**REGION, "north": 62.5}}, "not a multiple of resolution"),
        ({"region": {"south": 0, "north": 10}}, "region must be a dict with keys"),
        ({"region": {**REGION, "south": 70.0}}, "south < north"),
        ({"region": {**REGION, "west": 50.0}}, "west < east"),
        ({"resolution": 0.0}, "resolution must be a positive"),
        ({"end": "2000-12-31"}, r"end \(2000-12-31\) is before start"),
        ({"start": "01/01/2001"}, "start must be an ISO date"),
        ({"frequency": "monthly"}, "frequency must be one of"),
        ({"seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_bad_input_fails_clearly(kwargs, message):
    args = {
        "variables": ["2m_temperature"],
        "region": REGION,
        "resolution": RES,
        "start": "2001-01-01",
        "end": "2001-01-05",
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        synthetic.generate(**args)


def test_fine_scale_temperature_depends_on_the_weather():
    """Issue 16 §5: a statistical baseline (interpolation + the train mean residual per pixel
    and month) beats interpolation, yet leaves weather-dependent fine-scale structure (lapse
    rate with stability, valley cold pools under calm clear skies) that the coarse state
    predicts: a per-pixel regression on the local coarse state beats the baseline clearly."""
    from downscaler.evaluation.baselines import upsample
    from downscaler.pairs import make_pairs

    region = {"south": 40.0, "north": 48.0, "west": 0.0, "east": 8.0}
    fields, static = synthetic.generate(["2m_temperature", "total_precipitation"], region, 0.25,
                                        "2000-01-01", "2000-12-31", "daily", 11)
    fine, coarse = make_pairs(fields, static, 4)
    month = fine["time"].dt.month.values
    train, test = month <= 9, month > 9
    interp = upsample(coarse[["t2m"]], 4, "bicubic")["t2m"].values
    truth = fine["t2m"].values
    resid = truth - interp
    by_month = {m: resid[train & (month == m)].mean(0) for m in range(1, 10)}
    offset = resid[train].mean(0)  # months 10-12 are not in train: the all-train mean
    stat = interp[test] + offset
    # the learnable part: regress the de-seasonalised residual on the local coarse state
    tp = np.log1p(upsample(coarse[["tp"]], 4, "bilinear")["tp"].values.clip(0))
    clim = np.stack([interp[train & (month == m)].mean(0) for m in range(1, 10)]).mean(0)
    features = np.stack([interp - clim, tp, (interp - clim) * tp], -1)
    target = resid - np.stack([by_month.get(m, offset) for m in month])
    mean = features[train].mean(0)
    x = features[train] - mean
    w = np.linalg.solve(np.einsum("tyxi,tyxj->yxij", x, x) + 1e-6 * np.eye(3),
                        np.einsum("tyxi,tyx->yxi", x, target[train])[..., None])[..., 0]
    learned = stat + np.einsum("tyxi,yxi->tyx", features[test] - mean, w)

    def rmse(a):
        return float(np.sqrt(np.mean((a - truth[test]) ** 2)))

    assert rmse(stat) < 0.8 * rmse(interp[test])
    assert rmse(learned) < 0.9 * rmse(stat)
