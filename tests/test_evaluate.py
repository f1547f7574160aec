"""Evaluation stage: TILES seam check, benchmark reading and scaling plot, learned baselines in
the score table, and the HTML report of a tiny completed workflow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from downscaler.evaluate import (
    predictions,
    run_evaluation,
    unavailable_notes,
    write_scaling,
    write_scores,
    write_seams,
)
from downscaler.evaluation import benchmarks as B
from downscaler.evaluation import seams as S
from downscaler.evaluation import statistical as ST

from tests.conftest import REPO
from tests.test_figures import _check
from tests.test_infer import FACTOR, VARS, LocalModel, _data, _payload


def test_border_distance_by_hand():
    d = S.border_distance(4, 8, 1, 2)  # one vertical border between columns 3 and 4
    np.testing.assert_array_equal(d[0], [3, 2, 1, 0, 0, 1, 2, 3])
    assert (d == d[0]).all()
    d = S.border_distance(4, 8, 2, 2)
    np.testing.assert_array_equal(d[:, 0], [1, 0, 0, 1])
    np.testing.assert_array_equal(S.border_distance(4, 8, 1, 2, periodic_lon=True)[0],
                                  [0, 1, 1, 0, 0, 1, 1, 0])  # the date line is a border too
    assert np.isinf(S.border_distance(4, 8, 1, 1)).all()


def test_rmse_by_distance_by_hand():
    distance = np.array([[0, 1, np.inf]])
    sse = np.array([[8.0, 3.0, 100.0]])
    count = np.array([[2.0, 3.0, 1.0]])
    df = S.rmse_by_distance(sse, count, distance)
    assert df["distance"].tolist() == [0, 1]
    np.testing.assert_allclose(df["rmse"], [2.0, 1.0])
    assert df["n"].tolist() == [2, 3]


def test_seam_errors_vanish_with_halos_and_sit_at_borders_without():
    coarse, fine, static, stats = _data(n_time=4, n_lat=8, n_lon=8)
    model = LocalModel()
    payload = _payload(stats, div=(2, 2), halo=1, patch=1, pad_mode="edge")
    from downscaler.infer import downscale

    # Truth = the untiled prediction: the trained halo covers the model's receptive field (one
    # coarse pixel = FACTOR fine pixels), so its error is ~0; without a halo exactly the pixels
    # within FACTOR of an inner border err (edge padding matches the model's own at the domain
    # edges).
    truth = downscale(model, payload, coarse, static, div=(1, 1))
    errors = S.seam_errors(model, payload, coarse, xr.merge([truth, static]), batch_size=64,
                           time_chunk=3)
    assert set(errors["setting"]) == {"halo 1 (as trained)", "halo 0", "whole domain, no tiles"}
    for setting, part in errors.groupby("setting"):
        near = part[part["distance"] < FACTOR]["rmse"]
        far = part[part["distance"] >= FACTOR]["rmse"]
        assert far.max() < 1e-4, setting
        if setting == "halo 0":
            assert near.min() > 1e-2
        else:
            assert near.max() < 1e-4
    totals = errors.groupby(["setting", "variable"])["n"].sum()
    assert (totals == 4 * fine.sizes["lat"] * fine.sizes["lon"]).all()
    assert set(errors["variable"]) == set(VARS)


def test_seam_figure(tmp_path):
    rows = [{"setting": s, "variable": v, "distance": d, "rmse": r * (1 + 1 / (d + 1)), "n": 10}
            for s, r in (("halo 2 (as trained)", 0.5), ("halo 0", 0.8))
            for v in VARS for d in range(12)]
    paths = write_seams(pd.DataFrame(rows), tmp_path / "seams.csv", tmp_path / "seams.png", 8)
    _check(paths, tmp_path / "seams")
    assert pd.read_csv(tmp_path / "seams.csv").shape == (len(rows), 5)


def test_one_tile_has_no_seams_and_a_note_instead_of_a_figure(tmp_path):
    """Issue 16 section 3: div 1x1, halo 0 is a valid tiling; the seam check says so."""
    coarse, fine, static, stats = _data(n_time=2, n_lat=8, n_lon=8)
    payload = _payload(stats, div=(1, 1), halo=0, patch=1)
    assert S.seam_settings(payload) == {"halo 0 (as trained)": {}}
    errors = S.seam_errors(LocalModel(), payload, coarse, xr.merge([fine, static]),
                           batch_size=64, time_chunk=32)
    assert errors.empty and list(errors.columns) == S.COLUMNS
    paths = write_seams(errors, tmp_path / "seams.csv", tmp_path / "seams.png", 0)
    _check(paths, tmp_path / "seams")
    assert pd.read_csv(tmp_path / "seams.csv").empty


def _bench_files(folder):
    folder.mkdir()
    # Layout of benchmarks/bench_reslim_vs_baseline.py: cases under a dict with args.
    (folder / "reslim_vs_baseline.json").write_text(json.dumps({
        "benchmark": "reslim_vs_baseline", "machine": {"cpu_count": 2},
        "args": {"batch": 2}, "cases": [
            {"model": "reslim", "coarse": 8, "step_s": 0.5},
            {"model": "reslim", "coarse": 16, "step_s": 1.0},
            {"model": "upsample_vit", "coarse": 8, "step_s": 2.0}]}))
    # A strong-scaling list of records with explicit throughput.
    (folder / "tiles_scaling.json").write_text(json.dumps([
        {"world_size": 1, "samples_per_s": 10.0, "domain": "32x64"},
        {"world_size": 2, "samples_per_s": 18.0, "domain": "32x64"},
        {"world_size": 4, "samples_per_s": 30.0, "domain": "32x64"}]))
    (folder / "broken.json").write_text("{not json")


def test_load_benchmarks_reads_the_layouts_it_knows(tmp_path):
    _bench_files(tmp_path / "results")
    df, problems = B.load_benchmarks(tmp_path / "results")
    assert len(problems) == 1 and problems[0].startswith("broken.json")
    rvb = df[df["file"] == "reslim_vs_baseline"].reset_index(drop=True)
    assert rvb["series"].tolist() == ["reslim_vs_baseline: reslim"] * 2 + [
        "reslim_vs_baseline: upsample_vit"]
    np.testing.assert_allclose(rvb["domain"], [64, 256, 64])  # a side of 8 is an 8 x 8 grid
    np.testing.assert_allclose(rvb["throughput"], [4.0, 2.0, 1.0])  # batch 2 / step seconds
    ts = df[df["file"] == "tiles_scaling"].reset_index(drop=True)
    np.testing.assert_allclose(ts["processes"], [1, 2, 4])
    np.testing.assert_allclose(ts["domain"], [2048] * 3)
    np.testing.assert_allclose(B.scaling_efficiency(ts, "processes"), [1.0, 0.9, 0.75])
    # Domain scaling: grid points per second relative to the smallest domain (4*64 vs 2*256).
    np.testing.assert_allclose(B.scaling_efficiency(rvb.iloc[:2], "domain"), [1.0, 2.0])


def test_scaling_figure_with_and_without_results(tmp_path):
    _bench_files(tmp_path / "results")
    paths = write_scaling(str(tmp_path / "results"), tmp_path / "scaling.csv",
                          tmp_path / "scaling.png")
    _check(paths, tmp_path / "scaling")
    assert len(pd.read_csv(tmp_path / "scaling.csv")) == 6
    paths = write_scaling(str(tmp_path / "nothing"), tmp_path / "none.csv",
                          tmp_path / "none.png")
    _check(paths, tmp_path / "none")
    assert pd.read_csv(tmp_path / "none.csv").empty


def test_learned_baseline_joins_the_score_table(tmp_path):
    coarse, fine, _, _ = _data(n_time=3)
    truth = fine[VARS]
    vit = truth + 0.5
    preds = predictions(truth + 0.1, coarse, truth, ["bilinear"], learned={"upsample_vit": vit})
    assert list(preds) == ["reslim", "upsample_vit", "bilinear"]
    ev = run_evaluation(truth + 0.1, coarse, truth, ["bilinear"],
                        learned={"upsample_vit": vit}, time_chunk=2)
    write_scores(ev.table(), tmp_path / "m.csv", tmp_path / "t.md", tmp_path / "v.rst")
    table = pd.read_csv(tmp_path / "m.csv")
    bias = table[(table["metric"] == "bias") & (table["variable"] == "t2m")]
    np.testing.assert_allclose(bias.set_index("method").loc[["reslim", "upsample_vit"], "value"],
                               [0.1, 0.5], atol=1e-4)
    assert "| upsample_vit | t2m (K)" in (tmp_path / "t.md").read_text()
    with pytest.raises(KeyError, match="upsample_vit"):
        predictions(truth, coarse, truth, [], learned={"upsample_vit": vit.drop_vars("tp")})


def _calendar_data(n_days=60, seed=0):
    """Fine truth = bicubic(coarse) + a fixed residual pattern per (hour, month) per pixel +
    a linear function of the interpolated inputs, hourly every 6 h over two months."""
    coarse, fine, static, stats = _data(n_time=4 * n_days, n_lat=4, n_lon=4, seed=seed)
    time = np.datetime64("2000-01-01T00") + np.arange(4 * n_days) * np.timedelta64(6, "h")
    coarse = coarse.assign_coords(time=time)
    fine = fine.assign_coords(time=time)
    return coarse, fine, static, stats


def test_residual_climatology_recovers_a_calendar_pattern_exactly():
    coarse, fine, _, _ = _calendar_data()
    up = ST.interpolate_inputs(coarse, VARS, fine["lat"].values, fine["lon"].values)
    rng = np.random.default_rng(0)
    hours, months = coarse["time"].dt.hour.values, coarse["time"].dt.month.values
    pattern = rng.normal(0, 2, (24, 13, fine.sizes["lat"], fine.sizes["lon"]))
    truth = up[["t2m"]].copy()
    truth["t2m"] = up["t2m"] + pattern[hours, months]
    fitted = ST.fit_statistical(coarse, truth, VARS, ["t2m"], time_chunk=7)
    assert fitted["hour"].values.tolist() == [0, 6, 12, 18]
    pred = ST.predict_statistical("residual_climatology", fitted, up, ["t2m"])
    np.testing.assert_allclose(pred["t2m"].values, truth["t2m"].values, atol=1e-3)
    # a (hour, month) never seen falls back to that hour's mean over the months seen
    later = up.assign_coords(time=up["time"].values + np.timedelta64(120, "D"))
    pred = ST.predict_statistical("residual_climatology", fitted, later.isel(time=[0]),
                                  ["t2m"])
    seen = fitted["t2m_residual"].sel(hour=0).isel(month=[0, 1])
    count = fitted["t2m_residual_count"].sel(hour=0).isel(month=[0, 1])
    expect = up["t2m"].isel(time=0) + (seen * count).sum("month") / count.sum("month")
    np.testing.assert_allclose(pred["t2m"].isel(time=0).values, expect.values, atol=1e-3)


def test_mos_recovers_a_per_pixel_linear_relation_and_handles_missing_targets():
    coarse, fine, _, _ = _calendar_data(n_days=20)
    up = ST.interpolate_inputs(coarse, VARS, fine["lat"].values, fine["lon"].values)
    rng = np.random.default_rng(1)
    shape = (fine.sizes["lat"], fine.sizes["lon"])
    a, b, c = (rng.normal(0, 1, shape) for _ in range(3))
    target = (a + b * (up["t2m"] - 280) + c * up["tp"]).transpose("time", "lat", "lon")
    truth = xr.Dataset({"t2m": target})
    truth["t2m"][:, 0, 0] = np.nan  # a pixel without data: no fit, NaN prediction
    truth["t2m"][::3, 1, 1] = np.nan  # gaps are left out of the sums
    fitted = ST.fit_statistical(coarse, truth, VARS, ["t2m"], time_chunk=9)
    pred = ST.predict_statistical("mos", fitted, up, ["t2m"])
    assert np.isnan(pred["t2m"][:, 0, 0]).all()
    ok = np.isfinite(truth["t2m"].values)
    np.testing.assert_allclose(pred["t2m"].values[ok], target.values[ok], atol=2e-3)
    # a target that is not an input has MOS but no residual climatology
    assert "t2m_residual" not in ST.fit_statistical(coarse, truth.rename(t2m="t2m_obs"),
                                                     VARS, ["t2m_obs"], time_chunk=9)
    with pytest.raises(ValueError, match="unknown statistical baseline"):
        ST.predict_statistical("climatology", fitted, up, ["t2m"])


def test_streaming_evaluation_with_every_baseline_an_ensemble_and_figures(tmp_path):
    """The evaluation stage's library path: statistical baselines in the table, an ensemble's
    CRPS / spread-skill / rank histogram, the same deterministic scores chunk by chunk, and
    every figure written."""
    coarse, fine, _, _ = _calendar_data(n_days=12)
    truth = fine[VARS]
    fitted = ST.fit_statistical(coarse.isel(time=slice(0, 32)), truth.isel(time=slice(0, 32)),
                                VARS, VARS, time_chunk=8)
    test = slice(32, None)
    rng = np.random.default_rng(2)
    model = truth.isel(time=test) + 0.3
    members = xr.concat([model + rng.normal(0, 0.5, model["t2m"].shape) for _ in range(4)],
                        dim="member").transpose("time", "member", "lat", "lon")
    members["tp"] = members["tp"].clip(min=0)
    baselines = ["nearest", "bilinear", "bicubic", "residual_climatology", "mos"]
    one = run_evaluation(members, coarse, truth, baselines, fitted=fitted, time_chunk=5)
    table = one.table()
    assert set(table["method"]) == {"reslim", *baselines}
    ens = table[table["metric"].isin(["crps", "spread_skill_ratio"])]
    assert set(ens["variable"]) == {"t2m", "tp", "tp_log1p"} and ens["value"].notna().all()
    whole = run_evaluation(members, coarse, truth, baselines, fitted=fitted, time_chunk=100)
    det = ~table["metric"].isin(["crps", "spread", "spread_skill_ratio", "members"])
    np.testing.assert_allclose(table[det]["value"], whole.table()[det]["value"], rtol=1e-9)
    # the deterministic scores of the ensemble run are those of its mean
    mean = run_evaluation(members.mean("member"), coarse, truth, baselines, fitted=fitted,
                          time_chunk=5).table()
    assert "crps" not in set(mean["metric"])
    np.testing.assert_allclose(mean["value"], table[det]["value"], rtol=1e-6)
    paths = one.write_figures(tmp_path, table)
    names = {p.name for p in paths}
    for kind in ("maps", "spectra", "pdfs", "scatter", "bias"):
        for v in VARS:
            assert f"{kind}_{v}.png" in names
    assert {"skill.png", "rank_histogram.png"} <= names
    for name in ("bias_t2m", "rank_histogram", "skill", "scatter_tp"):
        _check((tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"), tmp_path / name)


def test_a_target_that_is_not_an_input_skips_the_interpolation_baselines(tmp_path):
    coarse, fine, _, _ = _calendar_data(n_days=8)
    truth = fine[["t2m"]].rename(t2m="t2m_obs")
    inputs = VARS
    fitted = ST.fit_statistical(coarse, truth.isel(time=slice(0, 16)), inputs, ["t2m_obs"])
    model = truth.isel(time=slice(16, None)) + 0.2
    ev = run_evaluation(model, coarse, truth, ["bicubic", "residual_climatology", "mos"],
                        inputs=inputs, targets=["t2m_obs"], fitted=fitted, time_chunk=6)
    assert set(ev.table()["method"]) == {"reslim", "mos"}
    notes = unavailable_notes(["bicubic", "residual_climatology", "mos"], inputs, ["t2m_obs"])
    assert len(notes) == 1 and "t2m_obs" in notes[0] and "bicubic" in notes[0]
    write_scores(ev.table(), tmp_path / "m.csv", tmp_path / "t.md", notes=notes)
    assert "not among the inputs" in (tmp_path / "t.md").read_text()


TINY_CONFIG = """
seed: 1
source: synthetic
variables: [2m_temperature, total_precipitation]
statics: [orography, land_sea_mask, latitude]
region: {south: 30.0, north: 38.0, west: -8.0, east: 8.0}
period: {start: "2000-01-01", end: "2000-02-29"}
frequency: daily
resolution: 0.5
split:
  train: {start: "2000-01-01", end: "2000-02-09"}
  val: {start: "2000-02-10", end: "2000-02-19"}
  test: {start: "2000-02-20", end: "2000-02-29"}
tiles: {div_lat: 2, div_lon: 2, halo: 1, pad_mode: symmetric}
model: {preset: tiny}
train: {epochs: 1, batch_size: 16}
infer: {time_chunk: 4}
"""


def _random_checkpoint(results, **overrides):
    """A checkpoint of an untrained tiny Reslim for the tiles the workflow made, and a short
    training log: the report test exercises inference, evaluation and the report, not training."""
    import torch
    import zarr
    from downscaler.checkpoint import save_checkpoint
    from downscaler.model.presets import build_model

    attrs = dict(zarr.open_group(str(results / "tiles" / "train.zarr"), mode="r").attrs)
    torch.manual_seed(0)
    model = build_model("tiny", attrs["variables"], attrs["variables"], attrs["statics"],
                        mag=attrs["factor"], **overrides)
    tiling = {k: attrs[k] for k in ("div_lat", "div_lon", "halo", "pad_mode", "factor")}
    save_checkpoint(results / "model" / "checkpoint.pt", model, variables=attrs["variables"],
                    statics=attrs["statics"], stats=attrs["stats"], tiling=tiling,
                    res_km=attrs["res_km"], config={"seed": 1})
    pd.DataFrame({"step": [1, 2, 3, 4], "epoch": [1, 1, 2, 2],
                  "train_loss": [1.0, 0.8, 0.6, 0.5], "val_loss": [None, 0.9, None, 0.7],
                  "lr": [1e-3, 2e-3, 1e-3, 0.0]}).to_csv(results / "model" / "training_log.csv",
                                                        index=False)


@pytest.mark.slow
def test_tiny_workflow_builds_the_report(tmp_path):
    """The demo workflow on a tiny domain (an untrained model in place of training), then
    `snakemake --report`: every figure, the seam check, the scaling plot and the captions."""
    (tmp_path / "config.yaml").write_text(TINY_CONFIG)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    snakemake = shutil.which("snakemake", path=env["PATH"])
    base = [snakemake, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
            "--configfile", str(tmp_path / "config.yaml"), "--cores", "2", "-q"]

    def run(*args):
        done = subprocess.run([*base, *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    run("--omit-from", "train")
    _random_checkpoint(tmp_path / "results")
    run()
    figures = tmp_path / "results" / "evaluation" / "figures"
    for kind in ("maps", "spectra", "pdfs", "scatter", "bias"):
        for name in VARS:
            assert (figures / f"{kind}_{name}.png").stat().st_size > 5_000
            assert (figures / f"{kind}_{name}.pdf").exists()
    for name in ("training_curves", "tiles_seams", "scaling"):
        assert (figures / f"{name}.png").stat().st_size > 5_000
    with xr.open_dataset(tmp_path / "results" / "downscaled" / "test.nc") as ds:
        assert ds.sizes["time"] == 10 and "checkpoint_sha256" in ds.attrs
    metrics = pd.read_csv(tmp_path / "results" / "evaluation" / "metrics.csv")
    assert {"reslim", "nearest", "bilinear", "bicubic", "residual_climatology",
            "mos"} == set(metrics["method"])
    table = (tmp_path / "results" / "evaluation" / "table.md").read_text()
    assert table.startswith("**Does reslim beat the best baseline?**")
    run("--report", "results/report.html")
    html = (tmp_path / "results" / "report.html").read_text()
    assert "TILES seam check on the test period" in html  # a caption, rendered
    assert "tiles_seams.png" in html and "metrics.csv" in html
    # the verdict is on the first page (an untrained model loses: in red)
    assert "beat the best baseline?" in html and "color:red" in html


@pytest.mark.slow
def test_tiny_workflow_with_one_tile_and_an_mc_dropout_ensemble(tmp_path):
    """One tile (div 1x1, halo 0) and infer.ensemble through Snakemake: the seam rule says there
    are no seams, the output has members, the scores have CRPS and the rank histogram exists."""
    config = TINY_CONFIG.replace("tiles: {div_lat: 2, div_lon: 2, halo: 1, pad_mode: symmetric}",
                                 "tiles: {div_lat: 1, div_lon: 1, halo: 0}")
    config = config.replace("model: {preset: tiny}", "model: {preset: tiny, dropout: 0.2}")
    config = config.replace("infer: {time_chunk: 4}",
                            "infer: {time_chunk: 4, ensemble: {mc_dropout: 3}}")
    assert "mc_dropout" in config and "div_lat: 1" in config
    (tmp_path / "config.yaml").write_text(config)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    snakemake = shutil.which("snakemake", path=env["PATH"])
    base = [snakemake, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
            "--configfile", str(tmp_path / "config.yaml"), "--cores", "2", "-q"]

    def run(*args):
        done = subprocess.run([*base, *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    run("--omit-from", "train")
    _random_checkpoint(tmp_path / "results", dropout=0.2)
    run()
    results = tmp_path / "results"
    with xr.open_dataset(results / "downscaled" / "test.nc") as ds:
        assert ds["t2m"].dims == ("time", "member", "lat", "lon") and ds.sizes["member"] == 3
    metrics = pd.read_csv(results / "evaluation" / "metrics.csv")
    crps = metrics[(metrics["metric"] == "crps") & (metrics["method"] == "reslim")]
    assert set(crps["variable"]) == {"t2m", "tp", "tp_log1p"} and (crps["value"] > 0).all()
    figures = results / "evaluation" / "figures"
    assert (figures / "rank_histogram.png").stat().st_size > 5_000
    assert pd.read_csv(results / "evaluation" / "tiles_seams.csv").empty
    assert (figures / "tiles_seams.png").stat().st_size > 5_000
