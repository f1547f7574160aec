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
from downscaler.evaluate import predictions, write_scaling, write_scores, write_seams
from downscaler.evaluation import benchmarks as B
from downscaler.evaluation import seams as S

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
    errors = S.seam_errors(model, payload, coarse, xr.merge([truth, static]), time_chunk=3)
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
    errors = S.seam_errors(LocalModel(), payload, coarse, xr.merge([fine, static]))
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
    preds = predictions(truth + 0.1, coarse, truth, ["bilinear"], {"upsample_vit": vit})
    assert list(preds) == ["reslim", "upsample_vit", "bilinear"]
    write_scores(preds, truth, tmp_path / "m.csv", tmp_path / "t.md")
    table = pd.read_csv(tmp_path / "m.csv")
    bias = table[(table["metric"] == "bias") & (table["variable"] == "t2m")]
    np.testing.assert_allclose(bias.set_index("method").loc[["reslim", "upsample_vit"], "value"],
                               [0.1, 0.5], atol=1e-4)
    assert "| upsample_vit | t2m (K)" in (tmp_path / "t.md").read_text()
    with pytest.raises(KeyError, match="upsample_vit"):
        predictions(truth, coarse, truth, [], {"upsample_vit": vit.drop_vars("tp")})


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


def _random_checkpoint(results):
    """A checkpoint of an untrained tiny Reslim for the tiles the workflow made, and a short
    training log: the report test exercises inference, evaluation and the report, not training."""
    import torch
    import zarr
    from downscaler.checkpoint import save_checkpoint
    from downscaler.model.presets import build_model

    attrs = dict(zarr.open_group(str(results / "tiles" / "train.zarr"), mode="r").attrs)
    torch.manual_seed(0)
    model = build_model("tiny", attrs["variables"], attrs["variables"], attrs["statics"],
                        mag=attrs["factor"])
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
    run("--report", "results/report.html")
    html = (tmp_path / "results" / "report.html").read_text()
    assert "TILES seam check on the test period" in html  # a caption, rendered
    assert "tiles_seams.png" in html and "metrics.csv" in html
