"""Metrics, interpolation baselines and the score table, against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from downscaler.evaluation import metrics as M
from downscaler.evaluation.baselines import METHODS, fine_coords, upsample
from downscaler.evaluation.scores import METRICS, markdown_table, score_table


def field(values, lat=None, lon=None, name="t2m") -> xr.DataArray:
    """(time, lat, lon) DataArray on a 1-degree grid unless coordinates are given."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 2:
        values = values[None]
    nt, ny, nx = values.shape
    lat = np.arange(ny, dtype=float) if lat is None else np.asarray(lat, dtype=float)
    lon = np.arange(nx, dtype=float) if lon is None else np.asarray(lon, dtype=float)
    return xr.DataArray(values, dims=("time", "lat", "lon"),
                        coords={"time": np.arange(nt), "lat": lat, "lon": lon}, name=name)


# truth 1..6 on a 1x2x3 grid; errors pred - truth = [1, 0, -1, 0, -1, 2] (sum 1, |.| 5, ^2 7)
TRUTH = field([[1, 2, 3], [4, 5, 6]], lat=[0, 60])
PRED = field([[2, 2, 2], [4, 4, 8]], lat=[0, 60])


def test_point_metrics_by_hand():
    assert float(M.rmse(PRED, TRUTH)) == pytest.approx(np.sqrt(7 / 6))
    assert float(M.bias(PRED, TRUTH)) == pytest.approx(1 / 6)
    assert float(M.mae(PRED, TRUTH)) == pytest.approx(5 / 6)
    # SS_res = 7, SS_tot = sum((t - 3.5)^2) = 17.5
    assert float(M.r2(PRED, TRUTH)) == pytest.approx(1 - 7 / 17.5)
    expected_r = np.corrcoef(PRED.values.ravel(), TRUTH.values.ravel())[0, 1]
    assert float(M.pearson_r(PRED, TRUTH)) == pytest.approx(expected_r)


def test_lat_weighted_rmse_by_hand():
    # cos(0), cos(60) = 1, 0.5 -> normalised 4/3, 2/3; row sums of squared error 2 and 5
    expected = np.sqrt((4 / 3 * 2 + 2 / 3 * 5) / 6)
    assert expected == pytest.approx(1.0)
    assert float(M.rmse(PRED, TRUTH, lat_weighted=True)) == pytest.approx(expected)
    assert M.lat_weights(TRUTH["lat"]).values == pytest.approx([4 / 3, 2 / 3])


def test_reduction_dims_keep_the_rest():
    per_lat = M.rmse(PRED, TRUTH, dims=["time", "lon"])
    assert per_lat.dims == ("lat",)
    assert per_lat.values == pytest.approx([np.sqrt(2 / 3), np.sqrt(5 / 3)])


def test_missing_values_are_skipped():
    pred = PRED.copy()
    pred[0, 1, 2] = np.nan  # drops the error of 2
    assert float(M.rmse(pred, TRUTH)) == pytest.approx(np.sqrt(3 / 5))
    assert float(M.r2(pred, TRUTH)) == pytest.approx(1 - 3 / 10)  # truth 1..5: SS_tot 10


def test_r2_is_not_pearson_r():
    rng = np.random.default_rng(0)
    truth = field(rng.normal(280, 5, (3, 8, 8)))
    biased = truth + 2.0
    assert float(M.pearson_r(biased, truth)) == pytest.approx(1.0)
    assert float(M.r2(biased, truth)) < 0.99
    assert float(M.r2(truth, truth)) == pytest.approx(1.0)
    # worse than the climatological mean: negative R^2
    assert float(M.r2(truth.mean() + 0 * truth - 10, truth)) < 0


def test_ssim_identity_noise_and_constants():
    rng = np.random.default_rng(1)
    y, x = np.meshgrid(np.linspace(0, 3, 32), np.linspace(0, 4, 32), indexing="ij")
    truth = field(np.stack([np.sin(x + t) * np.cos(y) for t in range(3)]))
    assert float(M.ssim(truth, truth)) == pytest.approx(1.0)
    scores = [float(M.ssim(truth + rng.normal(0, s, truth.shape), truth))
              for s in (0.05, 0.2, 0.8)]
    assert 1 > scores[0] > scores[1] > scores[2]
    # constant images: SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 L)^2
    ones = field(np.ones((1, 16, 16)))
    c1 = 0.01**2
    assert float(M.ssim(2 * ones, ones, data_range=1.0)) == pytest.approx(
        (4 + c1) / (5 + c1))


def test_psnr_of_known_mse():
    truth = field(np.linspace(0, 1, 60).reshape(1, 6, 10))
    pred = truth + 0.1  # MSE 0.01, data range 1 -> 20 dB
    assert float(M.psnr(pred, truth)) == pytest.approx(20.0)
    assert float(M.psnr(PRED, TRUTH)) == pytest.approx(10 * np.log10(25 / (7 / 6)))
    assert float(M.psnr(pred, truth, data_range=10.0)) == pytest.approx(40.0)
    assert np.isinf(float(M.psnr(truth, truth)))


def test_tail_rmse_picks_the_right_pixels():
    # truth 1..6: the 0.5 quantile is 3.5 -> pixels 4, 5, 6 with errors 0, -1, 2
    assert float(M.tail_rmse(PRED, TRUTH, 0.5)) == pytest.approx(np.sqrt(5 / 3))
    # 0.9 quantile is 5.5 -> pixel 6 alone, error 2
    assert float(M.tail_rmse(PRED, TRUTH, 0.9)) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        M.tail_rmse(PRED, TRUTH, 1.5)


def test_power_spectrum_of_a_sine():
    n = 32
    lon = np.arange(n, dtype=float)
    _, x = np.meshgrid(lon, lon, indexing="ij")
    sine = field(np.stack([3 * np.sin(2 * np.pi * 4 * x / n + t) for t in range(2)]))
    k, power = M.power_spectrum(sine)
    assert float(k[int(np.argmax(power.values))]) == pytest.approx(4 / n)  # cycles per degree
    # Parseval: all the variance sits in the kept annuli
    assert float((power * power["n_modes"]).sum()) == pytest.approx(float((sine**2).mean()))
    # a diagonal wave (3, 4) has |k| = 5 fundamentals: the radial average peaks there
    yy, xx = np.meshgrid(lon, lon, indexing="ij")
    diag = field(np.cos(2 * np.pi * (3 * yy + 4 * xx) / n))
    k, power = M.power_spectrum(diag)
    assert float(k[int(np.argmax(power.values))]) == pytest.approx(5 / n)
    # doubling the field quadruples the power
    _, p2 = M.power_spectrum(2 * diag)
    assert p2.values == pytest.approx(4 * power.values)


def test_log_spectral_distance():
    rng = np.random.default_rng(2)
    x = field(rng.normal(size=(2, 16, 16)))
    assert float(M.log_spectral_distance(x, x)) == pytest.approx(0.0)
    assert float(M.log_spectral_distance(2 * x, x)) == pytest.approx(10 * np.log10(4))
    smooth = x.rolling(lon=3, center=True, min_periods=1).mean()
    assert float(M.log_spectral_distance(smooth, x)) > 1.0


# ---------------------------------------------------------------- baselines


def coarse_dataset(values, lat=None, lon=None, name="t2m") -> xr.Dataset:
    da = field(values, lat, lon, name)
    da.attrs = {"units": "K", "long_name": "2 metre temperature"}
    return xr.Dataset({name: da}, attrs={"source": "test"})


def test_fine_coordinates_are_nested_cell_centres():
    assert fine_coords(np.array([0.0, 1.0]), 4) == pytest.approx(
        [-0.375, -0.125, 0.125, 0.375, 0.625, 0.875, 1.125, 1.375])
    ds = coarse_dataset(np.ones((1, 2, 3)))
    out = upsample(ds, 2, "nearest", fine_lat=[-0.25, 0.25, 0.75, 1.25])
    assert out["lat"].values == pytest.approx([-0.25, 0.25, 0.75, 1.25])
    with pytest.raises(ValueError, match="nested"):
        upsample(ds, 2, "nearest", fine_lat=[0.0, 0.5, 1.0, 1.5])
    with pytest.raises(ValueError, match="needs 4"):
        upsample(ds, 2, "nearest", fine_lat=[0.0, 1.0])


def test_unknown_method_lists_choices():
    with pytest.raises(ValueError, match="bilinear"):
        upsample(coarse_dataset(np.ones((1, 2, 2))), 2, "lanczos")


def test_nearest_is_block_constant():
    rng = np.random.default_rng(3)
    coarse = coarse_dataset(rng.normal(size=(3, 4, 5)))
    k = 4
    fine = upsample(coarse, k, "nearest")["t2m"].values
    assert fine.shape == (3, 16, 20)
    expected = np.repeat(np.repeat(coarse["t2m"].values, k, axis=1), k, axis=2)
    np.testing.assert_array_equal(fine, expected)


@pytest.mark.parametrize("method", METHODS)
def test_constant_stays_constant(method):
    coarse = coarse_dataset(np.full((2, 5, 6), 273.15))
    out = upsample(coarse, 3, method)
    np.testing.assert_allclose(out["t2m"].values, 273.15, rtol=1e-12)
    assert out["t2m"].attrs == coarse["t2m"].attrs  # attrs preserved
    assert out.attrs["source"] == "test"
    assert method in out.attrs["downscaling_method"]


def test_bilinear_is_exact_on_a_ramp_in_the_interior():
    k = 4
    lat, lon = np.arange(6) * 2.0 + 30, np.arange(7) * 2.0 - 100
    ramp = lambda la, lo: 3.0 + 0.5 * la - 0.25 * lo  # noqa: E731
    coarse = coarse_dataset(ramp(lat[:, None], lon[None, :]), lat, lon)
    out = upsample(coarse, k, "bilinear")["t2m"]
    exact = ramp(out["lat"].values[:, None], out["lon"].values[None, :])
    inner = (slice(k, -k), slice(k, -k))  # the border k/2 cells are clamped, not extrapolated
    np.testing.assert_allclose(out.values[0][inner], exact[inner], atol=1e-10)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_block_mean_is_close_to_coarse_value(method):
    k = 4
    lat, lon = np.arange(12.0), np.arange(16.0)
    smooth = np.sin(lat[:, None] / 3) * np.cos(lon[None, :] / 4)
    coarse = coarse_dataset(smooth, lat, lon)
    fine = upsample(coarse, k, method)["t2m"].values[0]
    block_mean = fine.reshape(12, k, 16, k).mean(axis=(1, 3))
    # amplitude 1, wavelength ~19 cells: interpolation smooths the block mean by ~1-2 %
    assert np.abs(block_mean - smooth)[1:-1, 1:-1].max() < 0.03


def test_precipitation_is_clipped_at_zero():
    spike = np.zeros((1, 6, 6))
    spike[0, 3, 3] = 50.0  # bicubic rings below zero next to an isolated shower
    other = upsample(coarse_dataset(spike, name="u10"), 4, "bicubic")["u10"]
    assert float(other.min()) < 0  # the overshoot exists ...
    tp = upsample(coarse_dataset(spike, name="tp"), 4, "bicubic")["tp"]
    assert float(tp.min()) == 0.0  # ... and is clipped for tp only
    assert float(tp.max()) > 0


def test_global_grid_wraps_in_longitude_and_chunks_agree():
    rng = np.random.default_rng(4)
    lon = np.arange(8) * 45.0 + 22.5  # closes the circle
    # constant in latitude, so the interpolation is purely in longitude
    coarse = coarse_dataset(np.repeat(rng.normal(size=(5, 1, 8)), 3, axis=1),
                            lat=[-60, 0, 60], lon=lon)
    out = upsample(coarse, 2, "bilinear")["t2m"].values
    x = coarse["t2m"].values
    # first fine cell sits a quarter cell west of coarse cell 0: 3/4 of it, 1/4 of the last one
    np.testing.assert_allclose(out[:, 2, 0], 0.75 * x[:, 1, 0] + 0.25 * x[:, 1, -1])
    np.testing.assert_allclose(upsample(coarse, 2, "bicubic", chunk=1)["t2m"].values,
                               upsample(coarse, 2, "bicubic", chunk=64)["t2m"].values)


def test_static_fields_and_dataarrays():
    ds = coarse_dataset(np.ones((2, 3, 4)))
    ds["orog"] = (("lat", "lon"), np.arange(12.0).reshape(3, 4))
    out = upsample(ds, 2, "nearest")
    assert out["orog"].dims == ("lat", "lon") and out["orog"].shape == (6, 8)
    da = upsample(ds["t2m"], 2, "bilinear")
    assert isinstance(da, xr.DataArray) and da.name == "t2m" and da.shape == (2, 6, 8)


# ---------------------------------------------------------------- scores


def _score_inputs():
    rng = np.random.default_rng(5)
    truth = xr.Dataset({
        "t2m": field(280 + rng.normal(0, 3, (4, 16, 16))),
        "tp": field(rng.gamma(0.5, 4, (4, 16, 16)), name="tp"),
    })
    preds = {
        "perfect": truth.copy(),
        "noisy": truth + rng.normal(0, 0.5, (4, 16, 16)),
    }
    preds["noisy"]["tp"] = preds["noisy"]["tp"].clip(min=0)
    return preds, truth


def test_score_table_is_tidy():
    preds, truth = _score_inputs()
    df = score_table(preds, truth, log_precip=True)
    assert list(df.columns) == ["method", "variable", "metric", "value"]
    # 2 methods x (t2m, tp, tp_log1p) x 12 metrics
    assert len(METRICS) == 12
    assert len(df) == 2 * 3 * 12
    assert set(df["metric"]) == {"rmse", "rmse_latw", "bias", "mae", "pearson_r", "r2", "ssim",
                                 "psnr", "rmse_q68.27", "rmse_q95.45", "rmse_q99.73", "lsd"}
    assert set(df["variable"]) == {"t2m", "tp", "tp_log1p"}
    perfect = df[df.method == "perfect"].set_index(["variable", "metric"])["value"]
    assert perfect["t2m", "rmse"] == 0 and perfect["tp", "r2"] == 1
    assert perfect["t2m", "ssim"] == pytest.approx(1.0)
    noisy = df[df.method == "noisy"].set_index(["variable", "metric"])["value"]
    assert 0.3 < noisy["t2m", "rmse"] < 0.7
    assert len(score_table(preds, truth, variables=["t2m"])) == 2 * 12


def test_score_table_aligns_float32_coords_and_rejects_other_grids():
    preds, truth = _score_inputs()
    p = preds["noisy"].assign_coords(lat=truth.lat.astype("f4"), lon=truth.lon.astype("f4"))
    df = score_table({"noisy": p}, truth, variables=["t2m"])
    assert df["value"].notna().all()
    with pytest.raises(ValueError, match="same fine grid"):
        score_table({"bad": truth.isel(lat=slice(0, 8))}, truth)


def test_markdown_table_header_and_rows():
    preds, truth = _score_inputs()
    text = markdown_table(score_table(preds, truth, log_precip=True))
    lines = text.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("| method")):]
    assert lines[0].startswith("| method | variable (units) | R² (1 − SS_res/SS_tot) |")
    assert "Pearson r" in lines[0] and "PSNR (dB)" in lines[0] and "SSIM" in lines[0]
    assert "RMSE > q99.73" in lines[0]
    assert any("| noisy | t2m (K) |" in line for line in lines)
    assert any("tp_log1p (log1p(mm/day))" in line for line in lines)
    assert sum(line.startswith("| ") for line in lines) == 1 + 2 * 3


# -- streaming evaluation -------------------------------------------------------------------

def _stream_table(preds, truth, time_chunk):
    from downscaler.evaluation.stream import (
        StreamingScores,
        score_variables,
        summarise_truth,
        time_chunks,
    )

    variables = score_variables(["t2m", "tp"], log_precip=True)
    summary = summarise_truth(lambda: time_chunks(truth, time_chunk), variables)
    acc = StreamingScores(variables, summary, truth["lat"].values, truth["lon"].values)
    for t0 in range(0, truth.sizes["time"], time_chunk):
        w = slice(t0, t0 + time_chunk)
        acc.add(truth.isel(time=w), {m: p.isel(time=w) for m, p in preds.items()})
    return acc.table()


@pytest.mark.parametrize("with_nan", [False, True])
def test_streaming_scores_equal_the_in_memory_table(with_nan):
    """One pass over time chunks gives the numbers of `score_table` on the whole period
    (with missing truth, all but the spectra, whose gap filling differs)."""
    preds, truth = _score_inputs()
    preds["biased"] = preds["noisy"] + 0.7
    if with_nan:
        truth = truth.copy(deep=True)
        truth["t2m"][1, 2:5, 3:9] = np.nan
        truth["tp"][:, 0, :] = np.nan
    whole = score_table(preds, truth, log_precip=True)
    streamed = _stream_table(preds, truth, time_chunk=3)
    assert set(streamed["metric"]) == set(whole["metric"]) | {"missing_fraction"}
    merged = whole.merge(streamed, on=["method", "variable", "metric"], suffixes=("", "_s"))
    assert len(merged) == len(whole)
    if with_nan:
        merged = merged[merged["metric"] != "lsd"]
    np.testing.assert_allclose(merged["value_s"], merged["value"], rtol=1e-9, atol=1e-12)
    assert (streamed[streamed.metric == "missing_fraction"]["value"] == 0).all()


def test_exact_streamed_quantiles_with_ties():
    from downscaler.evaluation.stream import summarise_truth, time_chunks

    rng = np.random.default_rng(3)
    values = np.where(rng.random((9, 6, 7)) < 0.7, 0.0, rng.gamma(0.5, 4, (9, 6, 7)))
    values[0, 0, 0] = np.nan
    ds = xr.Dataset({"tp": (("time", "lat", "lon"), values)})
    qs = (0.5, 0.6827, 0.9545, 0.9973)
    s = summarise_truth(lambda: time_chunks(ds, 2), {"tp": ("tp", None)}, qs)["tp"]
    for q in qs:
        assert s["quantiles"][q] == pytest.approx(np.nanquantile(values, q), rel=1e-12)
    assert s["n"] == values.size - 1 and s["min"] == 0


def _ensemble_table(truth, ens, members):
    from downscaler.evaluation.stream import EnsembleScores

    acc = EnsembleScores({"t2m": ("t2m", None)}, members)
    acc.add(truth, ens)
    return acc, acc.table("m").set_index("metric")["value"]


def _ens(values, truth):
    return xr.Dataset({"t2m": (("time", "member", "lat", "lon"), values)},
                      coords={"time": truth["time"]})


def test_crps_of_a_gaussian_ensemble_matches_the_closed_form():
    """Fair CRPS of many members drawn from N(mu, sigma) -> the Gaussian closed form."""
    import scoringrules

    rng = np.random.default_rng(0)
    obs = rng.normal(0, 1, (4, 5, 6))
    mu, sigma = 0.3, 1.5
    members = mu + sigma * rng.standard_normal((4, 400, 5, 6))
    truth = xr.Dataset({"t2m": (("time", "lat", "lon"), obs)},
                       coords={"time": np.arange(4)})
    _, table = _ensemble_table(truth, _ens(members, truth), 400)
    closed = float(np.mean(scoringrules.crps_normal(obs, mu, sigma)))
    # by hand: sigma (z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)) with z = (y - mu) / sigma
    from scipy.stats import norm

    z = (obs - mu) / sigma
    by_hand = np.mean(sigma * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / np.sqrt(np.pi)))
    assert closed == pytest.approx(by_hand, rel=1e-10)
    assert table["crps"] == pytest.approx(closed, rel=0.02)


def test_one_member_crps_is_the_mae_and_a_reliable_ensemble_is_flat():
    rng = np.random.default_rng(1)
    obs = rng.normal(0, 1, (3, 8, 8))
    truth = xr.Dataset({"t2m": (("time", "lat", "lon"), obs)}, coords={"time": np.arange(3)})
    one = obs[:, None] + rng.normal(0, 0.5, (3, 1, 8, 8))
    _, table = _ensemble_table(truth, _ens(one, truth), 1)
    assert table["crps"] == pytest.approx(np.abs(one[:, 0] - obs).mean(), rel=1e-12)
    # members and truth drawn from one distribution: spread-skill ~ 1, flat rank histogram
    signal = rng.normal(0, 1, (40, 1, 16, 16))
    many = signal + rng.normal(0, 1, (40, 9, 16, 16))
    obs = signal[:, 0] + rng.normal(0, 1, (40, 16, 16))
    truth = xr.Dataset({"t2m": (("time", "lat", "lon"), obs)}, coords={"time": np.arange(40)})
    acc, table = _ensemble_table(truth, _ens(many, truth), 9)
    assert table["spread_skill_ratio"] == pytest.approx(1.0, abs=0.05)
    freq = acc.ranks["t2m"] / acc.ranks["t2m"].sum()
    assert len(freq) == 10 and np.abs(freq - 0.1).max() < 0.02
    # an over-confident ensemble (spread too small): U-shaped histogram, ratio well below 1
    narrow = signal + 0.2 * rng.normal(0, 1, (40, 9, 16, 16))
    acc, table = _ensemble_table(truth, _ens(narrow, truth), 9)
    freq = acc.ranks["t2m"] / acc.ranks["t2m"].sum()
    assert table["spread_skill_ratio"] < 0.4 and freq[0] > 0.3 and freq[-1] > 0.3


def test_verdict_says_plainly_when_the_model_loses():
    from downscaler.evaluation.scores import verdict, verdict_rst

    rows = [("reslim", "t2m", 0.5), ("bicubic", "t2m", 1.0), ("mos", "t2m", 0.8),
            ("reslim", "tp", 2.2), ("bicubic", "tp", 2.5), ("mos", "tp", 2.0)]
    df = pd.DataFrame([{"method": m, "variable": v, "metric": "rmse", "value": x}
                       for m, v, x in rows])
    (t2m, tp) = verdict(df)
    assert t2m["beats"] and t2m["best"] == "mos" and t2m["margin"] == pytest.approx(0.375)
    assert not tp["beats"] and tp["best"] == "mos" and tp["margin"] == pytest.approx(-0.1)
    text = markdown_table(df)
    assert text.startswith("**Does reslim beat the best baseline?**")
    first = text.split("| method")[0]
    assert "t2m: yes" in first and "37.5% lower" in first
    assert '<span style="color:red">**tp: NO' in first and "10.0% higher" in first
    rst = verdict_rst(df)
    assert rst.startswith(".. raw:: html") and "color:red" in rst and "tp: NO" in rst


def test_ssim_equals_scikit_image():
    """Our SSIM is scikit-image's Gaussian-window SSIM (Wang et al. 2004) to float rounding;
    it stays hand-written because the streaming evaluation needs it per image with NaN masks."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(4)
    truth = rng.normal(280, 3, (3, 24, 32))
    pred = truth + rng.normal(0, 1.5, truth.shape)
    L = float(truth.max() - truth.min())
    ours = M.ssim_images(pred, truth, L)
    theirs = [structural_similarity(t, p, data_range=L, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
              for p, t in zip(pred, truth, strict=True)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)


def test_pearson_and_weighted_rmse_equal_reference_implementations():
    from scipy.stats import pearsonr

    rng = np.random.default_rng(5)
    lat = np.linspace(-60, 60, 12)
    t = xr.DataArray(rng.normal(0, 1, (4, 12, 10)), dims=("time", "lat", "lon"),
                     coords={"lat": lat})
    p = 0.8 * t + rng.normal(0, 0.5, t.shape)
    assert float(M.pearson_r(p, t)) == pytest.approx(pearsonr(p.values.ravel(),
                                                              t.values.ravel())[0], rel=1e-12)
    w = np.broadcast_to(np.cos(np.deg2rad(lat))[None, :, None], t.shape)
    expect = np.sqrt(np.average((p.values - t.values) ** 2, weights=w))
    assert float(M.rmse(p, t, lat_weighted=True)) == pytest.approx(expect, rel=1e-12)


def test_ssim_with_a_masked_region_stays_finite():
    rng = np.random.default_rng(6)
    truth = rng.normal(280, 3, (2, 24, 32))
    pred = truth + rng.normal(0, 1.0, truth.shape)
    masked = truth.copy()
    masked[:, :, :12] = np.nan  # "sea" over a third of the domain
    L = float(np.nanmax(masked) - np.nanmin(masked))
    score = M.ssim_images(pred, masked, L)
    assert np.isfinite(score).all() and all(0 < x < 1 for x in score)
    assert M.ssim_images(masked, masked, L) == pytest.approx([1.0, 1.0])
    # only the valid part counts: noise on the masked part changes nothing
    noisier = pred.copy()
    noisier[:, :, :12] += 50
    assert M.ssim_images(noisier, masked, L) == pytest.approx(score)
