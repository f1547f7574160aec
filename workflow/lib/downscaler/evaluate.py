"""The evaluation stage: score the model and the baselines on the test period, draw the figures,
run the TILES seam check and plot the scaling benchmarks. Metric definitions live in
`downscaler.evaluation.metrics`.

Methods in one table: the trained model ("reslim"), the interpolation baselines (nearest,
bilinear, bicubic) and, when a checkpoint for it is configured, the upsample-first ViT
("upsample_vit"), downscaled by the same tiled inference.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import xarray as xr

from downscaler.evaluation.baselines import upsample
from downscaler.evaluation.benchmarks import load_benchmarks
from downscaler.evaluation.figures import (
    plot_bias_maps,
    plot_maps,
    plot_pdfs,
    plot_scaling,
    plot_scatter,
    plot_seams,
    plot_spectra,
    plot_training_curves,
)
from downscaler.evaluation.scores import markdown_table, score_table
from downscaler.io import atomic_path

MODEL_NAME = "reslim"
UPSAMPLE_VIT = "upsample_vit"


def predictions(downscaled: xr.Dataset, coarse: xr.Dataset, truth: xr.Dataset,
                baselines: list[str],
                learned: dict[str, xr.Dataset] | None = None) -> dict[str, xr.Dataset]:
    """The model's prediction and each baseline's, on the truth's grid and times.

    `learned` adds other trained models' predictions (e.g. {"upsample_vit": ...}), restricted
    to the times of the model's own prediction.
    """
    variables = list(downscaled.data_vars)
    factor = truth.sizes["lat"] // coarse.sizes["lat"]
    out = {MODEL_NAME: downscaled[variables]}
    for method, ds in (learned or {}).items():
        missing = [v for v in variables if v not in ds]
        if missing:
            raise KeyError(f"the {method} prediction lacks {missing}; it must be trained on the "
                           f"same variables as the model")
        out[method] = ds[variables].sel(time=downscaled["time"])
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
        paths += plot_scatter(per_method[MODEL_NAME], truth[name], out / f"scatter_{name}.png")
    return paths


def write_seams(errors: pd.DataFrame, csv_path: str, figure: str, halo_fine: int) -> list[Path]:
    """The seam-check table (tidy: setting, variable, distance, rmse, n) and its figure."""
    with atomic_path(csv_path) as tmp:
        errors.to_csv(tmp, index=False)
    return list(plot_seams(errors, figure, halo_fine=halo_fine))


def write_scaling(results_dir: str, csv_path: str, figure: str) -> list[Path]:
    """Every benchmark record found under `results_dir` (tidy CSV) and the scaling figure.

    With no results the CSV has only its header and the figure says how to produce them, so
    the rule's outputs exist either way and the report always has the section.
    """
    bench, problems = load_benchmarks(results_dir)
    for problem in problems:
        print(f"scaling: skipped {problem}")
    with atomic_path(csv_path) as tmp:
        bench.to_csv(tmp, index=False)
    return list(plot_scaling(bench, figure, problems, results_dir))
