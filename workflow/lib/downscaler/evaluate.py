"""The evaluation stage: score the model and the interpolation baselines on the test period, and
draw the figures. Metric definitions live in `downscaler.evaluation.metrics`."""

from __future__ import annotations

from pathlib import Path

import xarray as xr

from downscaler.evaluation.baselines import upsample
from downscaler.evaluation.figures import (
    plot_bias_maps,
    plot_maps,
    plot_pdfs,
    plot_spectra,
    plot_training_curves,
)
from downscaler.evaluation.scores import markdown_table, score_table
from downscaler.io import atomic_path

MODEL_NAME = "reslim"


def predictions(downscaled: xr.Dataset, coarse: xr.Dataset, truth: xr.Dataset,
                baselines: list[str]) -> dict[str, xr.Dataset]:
    """The model's prediction and each baseline's, on the truth's grid and times."""
    variables = list(downscaled.data_vars)
    factor = truth.sizes["lat"] // coarse.sizes["lat"]
    out = {MODEL_NAME: downscaled[variables]}
    for method in baselines:
        out[method] = upsample(coarse[variables], factor, method,
                               fine_lat=truth["lat"], fine_lon=truth["lon"])
    return out


def write_scores(preds: dict[str, xr.Dataset], truth: xr.Dataset, metrics_csv: str,
                 table_md: str) -> None:
    """Tidy metrics.csv (method,variable,metric,value) and a Markdown table like ORBIT-2's."""
    table = score_table(preds, truth, list(preds[MODEL_NAME].data_vars), log_precip=True)
    with atomic_path(metrics_csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(table_md) as tmp:
        tmp.write_text(markdown_table(table))


def write_figures(preds: dict[str, xr.Dataset], coarse: xr.Dataset, truth: xr.Dataset,
                  loss_csv: str, figures_dir: str, map_time: int = 0) -> list[Path]:
    """Maps, spectra, PDFs and bias maps per variable, and the training curves."""
    out = Path(figures_dir)
    paths = list(plot_training_curves(loss_csv, out / "training_curves.png"))
    t = min(map_time, truth.sizes["time"] - 1)
    for name in preds[MODEL_NAME].data_vars:
        per_method = {m: p[name] for m, p in preds.items()}
        baseline = per_method.get("bicubic")
        paths += plot_maps(coarse[name].isel(time=t), per_method[MODEL_NAME].isel(time=t),
                           truth[name].isel(time=t), out / f"maps_{name}.png",
                           baseline=None if baseline is None else baseline.isel(time=t))
        paths += plot_spectra(per_method, truth[name], out / f"spectra_{name}.png")
        paths += plot_pdfs(per_method, truth[name], out / f"pdfs_{name}.png")
        paths += plot_bias_maps(per_method, truth[name], out / f"bias_{name}.png")
    return paths
