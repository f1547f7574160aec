"""Every figure function writes a real PNG (not blank) and a PDF, side by side."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from downscaler.evaluation import figures as F
from downscaler.evaluation.baselines import upsample


def _check(paths, expect_base: Path):
    png, pdf = paths
    assert png == expect_base.with_suffix(".png") and pdf == expect_base.with_suffix(".pdf")
    assert png.stat().st_size > 5_000
    assert pdf.stat().st_size > 1_000
    assert pdf.read_bytes().startswith(b"%PDF")
    img = mpimg.imread(png)
    assert img.ndim == 3 and img[..., :3].std() > 0.01  # not a single colour
    assert not list(png.parent.glob(".*tmp*"))  # no temporary files left behind


@pytest.fixture(scope="module")
def fields():
    rng = np.random.default_rng(0)
    k, nt = 4, 3
    lat, lon = np.arange(8) * 1.0 + 30, np.arange(10) * 1.0 - 100
    y, x = np.meshgrid(lat, lon, indexing="ij")
    base = 285 + 8 * np.sin(x / 3) * np.cos(y / 2)
    coarse = xr.Dataset({"t2m": (("time", "lat", "lon"),
                                 np.stack([base + rng.normal(0, 1, base.shape)
                                           for _ in range(nt)]))},
                        coords={"time": np.datetime64("2020-01-01T00") + np.arange(nt),
                                "lat": lat, "lon": lon})
    bilinear = upsample(coarse, k, "bilinear")["t2m"]
    truth = bilinear + rng.normal(0, 1.0, bilinear.shape)
    pred = bilinear + rng.normal(0, 0.5, bilinear.shape) + 0.3
    return coarse["t2m"], pred, truth, upsample(coarse, k, "nearest")["t2m"], bilinear


def test_plot_maps(tmp_path, fields):
    coarse, pred, truth, nearest, bilinear = fields
    _check(F.plot_maps(coarse, pred, truth, tmp_path / "maps.png", title="t2m test",
                       baseline=bilinear), tmp_path / "maps")
    _check(F.plot_maps(coarse, pred, truth, tmp_path / "maps_nobase"), tmp_path / "maps_nobase")


def test_plot_training_curves(tmp_path):
    steps = np.arange(1, 201)
    rows = ["step,epoch,train_loss,val_loss,lr"]
    for s in steps:
        val = f"{0.8 / np.sqrt(s / 20):.5f}" if s % 50 == 0 else ""
        rows.append(f"{s},{(s - 1) // 50},{1 / np.sqrt(s):.5f},{val},{1e-3 * (1 - s / 250):.6g}")
    csv = tmp_path / "metrics.csv"
    csv.write_text("\n".join(rows) + "\n")
    _check(F.plot_training_curves(csv, tmp_path / "curves.pdf"), tmp_path / "curves")
    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,lr\n0,0.1\n")
    with pytest.raises(ValueError, match="train_loss"):
        F.plot_training_curves(bad, tmp_path / "bad")


def test_plot_spectra_pdfs_scatter_bias(tmp_path, fields):
    _, pred, truth, nearest, bilinear = fields
    methods = {"reslim": pred, "nearest": nearest, "bilinear": bilinear}
    _check(F.plot_spectra(methods, truth, tmp_path / "spectra"), tmp_path / "spectra")
    _check(F.plot_pdfs(methods, truth, tmp_path / "pdfs"), tmp_path / "pdfs")
    _check(F.plot_scatter(pred, truth, tmp_path / "scatter"), tmp_path / "scatter")
    _check(F.plot_bias_maps(methods, truth, tmp_path / "sub" / "bias"), tmp_path / "sub" / "bias")


def test_scaling_figure_with_domain_sizes_only_and_with_unusable_records(tmp_path):
    from downscaler.evaluation.benchmarks import COLUMNS

    rows = [{"file": "b", "series": "b: reslim", "processes": None, "domain": d,
             "throughput": 100.0 / d, "throughput_unit": "samples/s", "efficiency": None}
            for d in (64, 256, 1024)]
    _check(F.plot_scaling(pd.DataFrame(rows, columns=COLUMNS), tmp_path / "dom.png"),
           tmp_path / "dom")
    unusable = pd.DataFrame([{**rows[0], "throughput": None}], columns=COLUMNS)
    _check(F.plot_scaling(unusable, tmp_path / "none.png", ["x.json: unreadable"], "here"),
           tmp_path / "none")


def test_maps_without_coastline_data(tmp_path, fields, monkeypatch):
    monkeypatch.setattr(F, "coastline_file", lambda: None)
    coarse, pred, truth = fields[:3]
    _check(F.plot_maps(coarse, pred, truth, tmp_path / "m.png"), tmp_path / "m")
