"""The evaluation stage: score the model and the baselines on the test period in one streaming
pass over time chunks, draw the figures, run the TILES seam check and plot the scaling
benchmarks. Metric definitions live in `downscaler.evaluation.metrics`; the streaming sums in
`downscaler.evaluation.stream`.

Methods in one table: the trained model ("reslim"; the ensemble mean for an ensemble run), the
interpolation baselines (nearest, bilinear, bicubic), the statistical baselines fitted on the
training period (residual_climatology, mos; `downscaler.evaluation.statistical`) and, when a
checkpoint for it is configured, the upsample-first ViT ("upsample_vit"), downscaled by the same
tiled inference. Interpolation-based baselines exist only for targets that are also inputs.
Memory is bounded by one time chunk (plus per-pixel sums), whatever the length of the period.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from downscaler.evaluation.baselines import METHODS as INTERPOLATIONS
from downscaler.evaluation.baselines import upsample
from downscaler.evaluation.benchmarks import load_benchmarks, machine_labels
from downscaler.evaluation.figures import (
    draw_bias_maps,
    draw_pdfs,
    draw_scatter,
    draw_spectra,
    plot_maps,
    plot_rank_histograms,
    plot_scaling,
    plot_seams,
    plot_skill,
    plot_training_curves,
)
from downscaler.evaluation.scores import markdown_table, verdict_rst
from downscaler.evaluation.statistical import (
    STATISTICAL,
    interpolate_inputs,
    predict_statistical,
)
from downscaler.evaluation.stream import (
    EnsembleScores,
    StreamingScores,
    score_variables,
    summarise_truth,
    time_chunks,
)
from downscaler.io import atomic_path
from downscaler.settings import schema_defaults

MODEL_NAME = "reslim"
UPSAMPLE_VIT = "upsample_vit"
BASELINES = (*INTERPOLATIONS, *STATISTICAL)
PDF_BINS = 80
SCATTER_BINS = 120


def io_lists(stats: dict | None, targets_fallback: list[str],
             inputs_fallback: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(inputs, targets) from stats.json's `inputs`/`targets` lists when present; otherwise the
    fallbacks (today's behaviour: the same variables in and out)."""
    stats = stats or {}
    targets = list(stats.get("targets") or targets_fallback)
    inputs = list(stats.get("inputs") or inputs_fallback or targets)
    return inputs, targets


def unavailable_notes(baselines: list[str], inputs: list[str], targets: list[str]) -> list[str]:
    """Table notes for the interpolation-based baselines that cannot exist for a target."""
    lacking = [v for v in targets if v not in inputs]
    methods = [m for m in baselines if m in (*INTERPOLATIONS, "residual_climatology")]
    if not lacking or not methods:
        return []
    return [f"{', '.join(methods)}: not available for {', '.join(lacking)}, which is not among "
            f"the inputs (nothing to interpolate); mos regresses it on all interpolated inputs."]


def chunk_predictions(model: xr.Dataset, coarse: xr.Dataset, truth: xr.Dataset,
                      baselines: list[str], *, inputs: list[str] | None = None,
                      targets: list[str] | None = None, fitted: xr.Dataset | None = None,
                      learned: dict[str, xr.Dataset] | None = None) -> dict[str, xr.Dataset]:
    """The model's prediction and each baseline's, on the truth's grid, for one time chunk.

    `model` may have a `member` dimension (then its mean is scored as the model). `learned`
    adds other trained models' predictions (e.g. {"upsample_vit": ...}) at the model's times.
    `fitted` holds the statistical baselines (`statistical.fit_statistical`).
    """
    targets = list(targets or model.data_vars)
    inputs = list(inputs or targets)
    if "member" in model.dims:
        model = model.mean("member", keep_attrs=True)
    out = {MODEL_NAME: model[targets]}
    for method, ds in (learned or {}).items():
        missing = [v for v in targets if v not in ds]
        if missing:
            raise KeyError(f"the {method} prediction lacks {missing}; it must be trained on the "
                           f"same variables as the model")
        out[method] = ds[targets].sel(time=model["time"])
    interp_targets = [v for v in targets if v in inputs]
    factor = truth.sizes["lat"] // coarse.sizes["lat"]
    fine = {"fine_lat": truth["lat"].values, "fine_lon": truth["lon"].values}
    up = None
    for method in baselines:
        if method in INTERPOLATIONS:
            if interp_targets:
                out[method] = upsample(coarse[interp_targets], factor, method, **fine)
        elif method in STATISTICAL:
            if fitted is None:
                raise ValueError(f"evaluate.baselines lists {method!r} but no fitted statistical "
                                 f"baselines were given (rule fit_baselines)")
            if up is None:
                up = interpolate_inputs(coarse, _fitted_inputs(fitted), fine["fine_lat"],
                                        fine["fine_lon"])
            pred = predict_statistical(method, fitted, up, targets)
            if pred.data_vars:
                out[method] = pred
        elif method != UPSAMPLE_VIT:
            raise ValueError(f"unknown baseline {method!r} in evaluate.baselines; choose from "
                             f"{[*BASELINES, UPSAMPLE_VIT]}")
    return out


def _fitted_inputs(fitted: xr.Dataset) -> list[str]:
    inputs = fitted.attrs["inputs"]
    return [inputs] if isinstance(inputs, str) else list(inputs)


# The in-memory form, for short periods and tests.
predictions = chunk_predictions


class Evaluation:
    """Everything the scores and figures need, accumulated chunk by chunk."""

    def __init__(self, targets: list[str], inputs: list[str], summary: dict[str, dict],
                 variables: dict[str, tuple], lat: np.ndarray, lon: np.ndarray,
                 members: int = 0, map_time: int = 0) -> None:
        self.targets, self.inputs, self.map_time = targets, inputs, map_time
        self.lat, self.lon = lat, lon
        self.scores = StreamingScores(variables, summary, lat, lon)
        self.ensemble = EnsembleScores(variables, members) if members else None
        self.edges = {}
        for v in targets:
            lo, hi = summary[v]["min"], summary[v]["max"]
            pad = 0.1 * (hi - lo) if hi > lo else 0.5
            self.edges[v] = (np.linspace(lo - pad, hi + pad, PDF_BINS + 1),
                             np.linspace(lo - pad, hi + pad, SCATTER_BINS + 1))
        self.pdf: dict[tuple[str | None, str], np.ndarray] = {}
        self.scatter = {v: np.zeros((SCATTER_BINS, SCATTER_BINS)) for v in targets}
        self.maps: dict[str, dict] = {}
        self.like: dict[str, xr.DataArray] = {}
        self.steps = 0

    def _hist(self, key, values: np.ndarray, edges: np.ndarray) -> None:
        values = np.clip(values[np.isfinite(values)], edges[0], edges[-1])
        counts = np.histogram(values, edges)[0]
        self.pdf[key] = self.pdf.get(key, 0) + counts

    def add(self, truth: xr.Dataset, coarse: xr.Dataset, preds: dict[str, xr.Dataset],
            ensemble: xr.Dataset | None = None) -> None:
        self.scores.add(truth, preds)
        if self.ensemble is not None and ensemble is not None:
            self.ensemble.add(truth, ensemble)
        n = truth.sizes["time"]
        for v in self.targets:
            t = truth[v].transpose("time", "lat", "lon").values
            self.like.setdefault(v, truth[v].isel(time=0, drop=True))
            pdf_edges, sc_edges = self.edges[v]
            self._hist((None, v), t, pdf_edges)
            for method, pred in preds.items():
                if v not in pred:
                    continue
                p = pred[v].transpose("time", "lat", "lon").values
                self._hist((method, v), np.where(np.isfinite(t), p, np.nan), pdf_edges)
                if method == MODEL_NAME:
                    ok = np.isfinite(t) & np.isfinite(p)
                    self.scatter[v] += np.histogram2d(
                        np.clip(t[ok], sc_edges[0], sc_edges[-1]),
                        np.clip(p[ok], sc_edges[0], sc_edges[-1]), [sc_edges, sc_edges])[0]
            # the map shows step map_time, or the last step when the period is shorter
            if self.map_time >= self.steps or v not in self.maps:
                i = min(max(self.map_time - self.steps, 0), n - 1)
                base = preds.get("bicubic", preds.get("mos"))
                self.maps[v] = {
                    "coarse": coarse[v].isel(time=i).load() if v in coarse else None,
                    "prediction": preds[MODEL_NAME][v].isel(time=i).load(),
                    "truth": truth[v].isel(time=i).load(),
                    "baseline": None if base is None or v not in base else
                    base[v].isel(time=i).load(),
                    "baseline_name": "bicubic" if "bicubic" in preds else "mos",
                }
        self.steps += n

    def table(self) -> pd.DataFrame:
        table = self.scores.table()
        if self.ensemble is not None:
            table = pd.concat([table, self.ensemble.table(MODEL_NAME)], ignore_index=True)
        return table

    def write_figures(self, figures_dir: str | Path, table: pd.DataFrame | None = None
                      ) -> list[Path]:
        """Maps, spectra, PDFs, scatter and bias maps per target, the skill bars, and the rank
        histograms of an ensemble run."""
        out = Path(figures_dir)
        paths = []
        methods = self.scores.methods()
        for v in self.targets:
            like = self.like[v].rename(v)
            m = self.maps[v]
            paths += plot_maps(m["coarse"], m["prediction"], m["truth"], out / f"maps_{v}.png",
                               baseline=m["baseline"], baseline_name=m["baseline_name"])
            truth_spectrum = self.scores.spectrum(None, v)
            spectra = {}
            values = {}
            for method in methods:
                if (method, v) not in self.scores.sums:
                    continue
                k, p = self.scores.spectrum(method, v)
                values[method] = self.scores.values(method, v)
                spectra[method] = (k, p, values[method]["lsd"])
            paths += draw_spectra(spectra, truth_spectrum, like, out / f"spectra_{v}.png")
            paths += draw_pdfs(self.edges[v][0], self.pdf[(None, v)],
                               {mt: self.pdf[(mt, v)] for mt in spectra}, like,
                               out / f"pdfs_{v}.png")
            model = values[MODEL_NAME]
            paths += draw_scatter(self.scatter[v], self.edges[v][1], model["r2"],
                                  model["pearson_r"], like, out / f"scatter_{v}.png")
            coords = {"lat": self.lat, "lon": self.lon}
            biases = {mt: xr.DataArray(self.scores.bias_map(mt, v), dims=("lat", "lon"),
                                       coords=coords) for mt in spectra}
            paths += draw_bias_maps(biases, like, out / f"bias_{v}.png")
        if table is not None:
            paths += plot_skill(table, MODEL_NAME, out / "skill.png")
        if self.ensemble is not None:
            paths += plot_rank_histograms({v: self.ensemble.ranks[v] for v in self.targets},
                                          out / "rank_histogram.png")
        return paths


# netCDF-C keeps a chunk cache per open variable (64 MiB by default here) that fills as a file
# is read: the streaming pass reads every chunk once, so a small cache bounds memory for free.
NETCDF_CACHE_BYTES = 4 * 2**20


def limit_netcdf_cache(nbytes: int = NETCDF_CACHE_BYTES) -> None:
    """Use a `nbytes` chunk cache per variable for netCDF files opened from now on."""
    import netCDF4

    netCDF4.set_chunk_cache(nbytes, 1009, 0.75)


def run_evaluation(downscaled: xr.Dataset, coarse: xr.Dataset, truth: xr.Dataset,
                   baselines: list[str], *, inputs: list[str] | None = None,
                   targets: list[str] | None = None, fitted: xr.Dataset | None = None,
                   learned: dict[str, xr.Dataset] | None = None, time_chunk: int,
                   map_time: int = schema_defaults("evaluate").map_time,
                   log_precip: bool = True) -> Evaluation:
    """Score every method on the model's time steps, `time_chunk` steps at a time.

    The inputs may be lazy (opened files): only one chunk of each is loaded at a time, after
    three passes over the truth alone for its range and exact tail quantiles.
    """
    if time_chunk < 1:
        raise ValueError(f"evaluate.time_chunk must be >= 1, got {time_chunk}")
    targets = list(targets or downscaled.data_vars)
    inputs = list(inputs or targets)
    times = downscaled["time"]
    truth = truth[targets].sel(time=times)
    coarse = coarse[[v for v in inputs if v in coarse]].sel(time=times)
    variables = score_variables(targets, log_precip)
    summary = summarise_truth(lambda: time_chunks(truth, time_chunk), variables)
    ev = Evaluation(targets, inputs, summary, variables, truth["lat"].values,
                    truth["lon"].values, downscaled.sizes.get("member", 0), map_time)
    for t0 in range(0, times.size, time_chunk):
        window = slice(t0, t0 + time_chunk)
        model = downscaled[targets].isel(time=window).load()
        tr, c = truth.isel(time=window).load(), coarse.isel(time=window).load()
        learned_chunk = {m: ds.sel(time=model["time"]).load() for m, ds in
                         (learned or {}).items()}
        preds = chunk_predictions(model, c, tr, baselines, inputs=inputs, targets=targets,
                                  fitted=fitted, learned=learned_chunk)
        ev.add(tr, c, preds, model if "member" in model.dims else None)
    return ev


def write_scores(table: pd.DataFrame, metrics_csv: str | Path, table_md: str | Path,
                 verdict: str | Path | None = None, notes: list[str] | tuple = ()) -> None:
    """Tidy metrics.csv (method,variable,metric,value), the Markdown table (verdict first) and
    the verdict as reStructuredText for the Snakemake report."""
    with atomic_path(metrics_csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(table_md) as tmp:
        tmp.write_text(markdown_table(table, model=MODEL_NAME, notes=notes))
    if verdict is not None:
        with atomic_path(verdict) as tmp:
            tmp.write_text(verdict_rst(table, model=MODEL_NAME, notes=notes))


def write_training_curves(loss_csv: str | Path, figures_dir: str | Path) -> list[Path]:
    return list(plot_training_curves(loss_csv, Path(figures_dir) / "training_curves.png"))


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
    machines = machine_labels(results_dir) if Path(results_dir).is_dir() else []
    return list(plot_scaling(bench, figure, problems, results_dir, machines))
