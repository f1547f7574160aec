"""Publication figures: maps, training curves, spectra, PDFs, scatter and bias maps.

Each function writes a PNG (for the report) and a PDF (for papers) side by side, atomically, and
returns their paths. Every figure carries a title, axis labels with units and colour bars, so it
can be read without the code that made it. Matplotlib runs headless (Agg).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: compute nodes and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402

from downscaler.evaluation import metrics as M  # noqa: E402
from downscaler.io import atomic_path  # noqa: E402
from downscaler.variables import BY_SHORT_NAME  # noqa: E402

KM_PER_DEGREE = 111.195  # great-circle km per degree of latitude (mean Earth radius 6371 km)

# Sequential colour maps by variable; errors always use a diverging map centred on 0.
_CMAPS = {"tp": "YlGnBu", "u10": "PuOr_r", "v10": "PuOr_r"}
_DEFAULT_CMAP = "viridis"
_ERROR_CMAP = "RdBu_r"


def _save(fig: plt.Figure, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write `fig` as PNG and PDF next to each other (atomically) and close it."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix.lower() in (".png", ".pdf") else path
    out = []
    try:
        for ext in ("png", "pdf"):
            target = base.with_name(f"{base.name}.{ext}")
            with atomic_path(target) as tmp:
                fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
            out.append(target)
    finally:
        plt.close(fig)
    return out[0], out[1]


def _label(da: xr.DataArray) -> str:
    """'2m temperature (K)' from the registry, falling back to the DataArray's own attrs."""
    name = str(da.name) if da.name is not None else ""
    var = BY_SHORT_NAME.get(name)
    long_name = da.attrs.get("long_name") or (
        var.long_name.replace("_", " ") if var else name or "value")
    units = da.attrs.get("units") or (var.units if var else "")
    return f"{long_name} ({units})" if units else long_name


def _units(da: xr.DataArray) -> str:
    var = BY_SHORT_NAME.get(str(da.name))
    return da.attrs.get("units") or (var.units if var else "")


def _paren(units: str) -> str:
    """Bracket compound units so powers and reciprocals read right: K -> K, mm/day -> (mm/day)."""
    return f"({units})" if any(c in units for c in "/ *") else units


def _cmap(da: xr.DataArray) -> str:
    return _CMAPS.get(str(da.name), _DEFAULT_CMAP)


def _one_step(da: xr.DataArray, time_index: int) -> xr.DataArray:
    """A 2-D (lat, lon) field: select one time step if the field has a time axis."""
    if "time" in da.dims:
        da = da.isel(time=time_index)
    extra = [d for d in da.dims if d not in ("lat", "lon")]
    if extra:
        da = da.isel({d: 0 for d in extra})
    return da.transpose("lat", "lon")


def _robust_range(*fields: xr.DataArray, lo: float = 0.5, hi: float = 99.5) -> tuple[float, ...]:
    """Shared colour limits from percentiles of all fields, so outliers do not wash them out."""
    values = np.concatenate([np.ravel(f.values) for f in fields])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    vmin, vmax = np.percentile(values, [lo, hi])
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    return float(vmin), float(vmax)


def _symmetric_limit(*fields: xr.DataArray, q: float = 99.5) -> float:
    values = np.concatenate([np.abs(np.ravel(f.values)) for f in fields])
    values = values[np.isfinite(values)]
    lim = float(np.percentile(values, q)) if values.size else 0.0
    return lim if lim > 0 else 1.0


def _map(ax: plt.Axes, da: xr.DataArray, title: str, **kwargs) -> matplotlib.cm.ScalarMappable:
    """Draw a lat/lon field as cells (pcolormesh puts each value on its grid cell).

    Rasterized: in the PDF the mesh is one embedded image instead of a vector path per cell
    (the evaluation's PDFs took ~2/3 of the demo's evaluate rule); axes and text stay vector.
    """
    mesh = ax.pcolormesh(da["lon"].values, da["lat"].values, da.values, shading="nearest",
                         rasterized=True, **kwargs)
    _coastlines(ax, da)
    ax.set_title(title)
    ax.set_xlabel("longitude (°E)")
    ax.set_ylabel("latitude (°N)")
    ax.set_aspect("equal", adjustable="box")
    return mesh


def coastline_file() -> Path | None:
    """A Natural Earth coastline shapefile already on disk (cartopy's data dirs), else None.

    Never downloads: compute nodes are often offline, and a figure must not depend on network.
    """
    try:
        import cartopy
    except ImportError:
        return None
    roots = [cartopy.config.get(k) for k in ("pre_existing_data_dir", "data_dir")]
    for root in filter(None, roots):
        for res in ("50m", "110m", "10m"):
            path = (Path(root) / "shapefiles" / "natural_earth" / "physical"
                    / f"ne_{res}_coastline.shp")
            if path.is_file():
                return path
    return None


def _coastlines(ax: plt.Axes, da: xr.DataArray) -> None:
    """Draw coastlines on plain lat/lon axes when cartopy and offline data exist; else nothing."""
    path = coastline_file()
    if path is None:
        return
    from cartopy.io.shapereader import Reader

    lon, lat = da["lon"].values, da["lat"].values
    xlim, ylim = (float(lon.min()), float(lon.max())), (float(lat.min()), float(lat.max()))
    for geom in Reader(str(path)).geometries():
        for line in getattr(geom, "geoms", [geom]):
            x, y = np.asarray(line.xy[0]), np.asarray(line.xy[1])
            ax.plot(x, y, color="black", lw=0.6)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)


def _time_text(da: xr.DataArray) -> str:
    if "time" in da.coords and da["time"].size == 1:
        return f" — {np.datetime_as_string(da['time'].values, unit='h')}" if np.issubdtype(
            da["time"].dtype, np.datetime64) else f" — time {da['time'].values}"
    return ""


def plot_maps(
    coarse: xr.DataArray | None,
    prediction: xr.DataArray,
    truth: xr.DataArray,
    path: str | os.PathLike,
    title: str | None = None,
    baseline: xr.DataArray | None = None,
    *,
    time_index: int = 0,
    baseline_name: str = "baseline",
) -> tuple[Path, Path]:
    """One time step: coarse input | prediction | truth (| baseline) | prediction − truth.

    The field panels share one colour scale (robust 0.5–99.5 percentile limits over all of
    them), so differences in detail are visible as such; the error panel uses a symmetric
    diverging scale centred on 0.
    """
    p, t = (_one_step(x, time_index) for x in (prediction, truth))
    fields = [(p, "prediction"), (t, "truth")]
    if coarse is not None:  # a target that is not an input has no coarse field to show
        fields.insert(0, (_one_step(coarse, time_index), "coarse input"))
    if baseline is not None:
        fields.append((_one_step(baseline, time_index), baseline_name))
    err = p - t.assign_coords(lat=p["lat"], lon=p["lon"])
    vmin, vmax = _robust_range(*(f for f, _ in fields))
    lim = _symmetric_limit(err)

    n = len(fields) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.8), constrained_layout=True)
    for ax, (field, name) in zip(axes[:-1], fields, strict=True):
        mesh = _map(ax, field, name, cmap=_cmap(t), vmin=vmin, vmax=vmax)
    fig.colorbar(mesh, ax=list(axes[:-1]), shrink=0.8, label=_label(truth))
    emesh = _map(axes[-1], err, "prediction − truth", cmap=_ERROR_CMAP, vmin=-lim, vmax=lim)
    fig.colorbar(emesh, ax=axes[-1], shrink=0.8, label=f"error ({_units(truth)})")
    fig.suptitle((title or _label(truth)) + _time_text(t))
    return _save(fig, path)


def plot_training_curves(csv_path: str | os.PathLike, path: str | os.PathLike) -> tuple[Path, Path]:
    """Training and validation loss against optimiser step (log y), learning rate below.

    The CSV has columns step, epoch, train_loss, val_loss (empty on steps without validation),
    lr. Epoch boundaries are marked with faint vertical lines.
    """
    log = pd.read_csv(csv_path)
    missing = {"step", "train_loss"} - set(log.columns)
    if missing:
        raise ValueError(f"{csv_path}: training log lacks column(s) {sorted(missing)}")
    has_lr = "lr" in log.columns and log["lr"].notna().any()
    fig, axes = plt.subplots(2 if has_lr else 1, 1, figsize=(7, 5.5 if has_lr else 4),
                             sharex=True, constrained_layout=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]} if has_lr else None)
    ax = axes[0, 0]
    train = log.dropna(subset=["train_loss"])
    ax.plot(train["step"], train["train_loss"], lw=1, alpha=0.8, label="train")
    if "val_loss" in log.columns:
        val = log.dropna(subset=["val_loss"])
        if len(val):
            ax.plot(val["step"], val["val_loss"], "o-", ms=4, label="validation")
    ax.set_yscale("log")
    ax.set_ylabel("loss (normalised units, log scale)")
    ax.set_title("Training curves")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if "epoch" in log.columns:
        starts = log["step"][log["epoch"].diff().fillna(0) != 0]
        for a in axes[:, 0]:
            for s in starts:
                a.axvline(s, color="0.7", lw=0.6, ls=":")
    if has_lr:
        lr = log.dropna(subset=["lr"])
        axes[1, 0].plot(lr["step"], lr["lr"], color="tab:green", lw=1)
        axes[1, 0].set_ylabel("learning rate")
        axes[1, 0].grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("optimiser step")
    return _save(fig, path)


def _km_axis(ax: plt.Axes) -> None:
    """Top axis: wavelength in km for a wavenumber in cycles per degree."""
    def to_km(k):
        with np.errstate(divide="ignore"):
            return KM_PER_DEGREE / np.asarray(k, dtype=float)
    sec = ax.secondary_xaxis("top", functions=(to_km, to_km))
    sec.set_xlabel("wavelength (km, 1° ≈ 111 km)")


def plot_spectra(
    predictions: Mapping[str, xr.DataArray], truth: xr.DataArray, path: str | os.PathLike
) -> tuple[Path, Path]:
    """Radially averaged power spectra of each method and of the truth (log-log), with LSD.

    Interpolation and MSE-trained models lose power at high wavenumbers (small scales); the
    legend gives each method's log-spectral distance to the truth.
    """
    spectra = {}
    for name, pred in predictions.items():
        kp, pp = M.power_spectrum(pred)
        spectra[name] = (kp, pp, float(M.log_spectral_distance(pred, truth)))
    return draw_spectra(spectra, M.power_spectrum(truth), truth, path)


def draw_spectra(spectra: Mapping[str, tuple], truth_spectrum: tuple, like: xr.DataArray,
                 path: str | os.PathLike) -> tuple[Path, Path]:
    """The spectra figure from precomputed spectra: {method: (k, power, lsd)} and the truth's
    (k, power); `like` is any DataArray of the variable (name and units for the labels)."""
    fig, ax = plt.subplots(figsize=(7, 4.8), constrained_layout=True)
    k, pt = truth_spectrum
    ax.loglog(k, pt, color="black", lw=2.5, label="truth")
    for name, (kp, pp, lsd) in spectra.items():
        ax.loglog(kp, pp, lw=1.3, label=f"{name} (LSD {lsd:.2f} dB)")
    units = _units(like)
    ax.set_xlabel("wavenumber (cycles per degree)")
    ax.set_ylabel(f"power per mode ({_paren(units)}²)" if units else "power per mode")
    ax.set_title(f"Power spectra: {_label(like)}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _km_axis(ax)
    return _save(fig, path)


def plot_pdfs(
    predictions: Mapping[str, xr.DataArray],
    truth: xr.DataArray,
    path: str | os.PathLike,
    bins: int = 80,
) -> tuple[Path, Path]:
    """Histograms of all values (every pixel and time) per method and truth, log density.

    The log scale makes the tails (extremes) visible, where downscaling methods differ most.
    """
    tv = np.ravel(truth.values)
    tv = tv[np.isfinite(tv)]
    all_values = [tv] + [np.ravel(p.values) for p in predictions.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in all_values])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts = {name: np.histogram(v[np.isfinite(v)], edges)[0]
              for name, v in zip(predictions, all_values[1:], strict=True)}
    return draw_pdfs(edges, np.histogram(tv, edges)[0], counts, truth, path)


def _density(counts: np.ndarray, edges: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / (total * np.diff(edges)) if total else np.zeros(len(counts))


def draw_pdfs(edges: np.ndarray, truth_counts: np.ndarray, counts: Mapping[str, np.ndarray],
              like: xr.DataArray, path: str | os.PathLike) -> tuple[Path, Path]:
    """The value-distribution figure from histogram counts on shared `edges`."""
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    ax.stairs(_density(truth_counts, edges), edges, fill=True, color="0.8", label="truth")
    ax.stairs(_density(truth_counts, edges), edges, color="black", lw=1.5)
    for name, c in counts.items():
        ax.stairs(_density(c, edges), edges, lw=1.3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel(_label(like))
    ax.set_ylabel(f"probability density (1/{_paren(_units(like)) or 'unit'}, log scale)")
    ax.set_title(f"Value distributions: {_label(like)}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_scatter(
    prediction: xr.DataArray,
    truth: xr.DataArray,
    path: str | os.PathLike,
    bins: int = 120,
) -> tuple[Path, Path]:
    """Prediction against truth for every pixel and time: 2-D histogram counts (log), 1:1 line.

    R² (coefficient of determination) and Pearson r of all points are printed on the plot.
    """
    r2 = float(M.r2(prediction, truth))
    r = float(M.pearson_r(prediction, truth))
    p, t = np.ravel(prediction.values), np.ravel(truth.values)
    ok = np.isfinite(p) & np.isfinite(t)
    lo = float(min(p[ok].min(), t[ok].min())) if ok.any() else 0.0
    hi = float(max(p[ok].max(), t[ok].max())) if ok.any() else 1.0
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    counts = np.histogram2d(t[ok], p[ok], [edges, edges])[0]
    return draw_scatter(counts, edges, r2, r, truth, path)


def draw_scatter(counts: np.ndarray, edges: np.ndarray, r2: float, r: float,
                 like: xr.DataArray, path: str | os.PathLike) -> tuple[Path, Path]:
    """The scatter figure from a 2-D histogram: counts[truth bin, prediction bin]."""
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(5.6, 5), constrained_layout=True)
    shown = np.ma.masked_equal(counts.T, 0)
    mesh = ax.pcolormesh(edges, edges, shown, cmap="magma_r", rasterized=True,
                         norm=LogNorm(vmin=1, vmax=max(2, counts.max())))
    lo, hi = edges[0], edges[-1]
    ax.plot([lo, hi], [lo, hi], color="tab:blue", lw=1, ls="--", label="1:1")
    fig.colorbar(mesh, ax=ax, label="number of points (log scale)")
    ax.text(0.03, 0.97, f"R² (1 − SS_res/SS_tot) = {r2:.4f}\nPearson r = {r:.4f}\n"
            f"n = {int(counts.sum()):,}", transform=ax.transAxes, va="top",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"})
    label = _label(like)
    ax.set_xlabel(f"truth: {label}")
    ax.set_ylabel(f"prediction: {label}")
    ax.set_title(f"Prediction vs truth: {label}")
    ax.set_aspect("equal", adjustable="box")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_bias_maps(
    predictions: Mapping[str, xr.DataArray], truth: xr.DataArray, path: str | os.PathLike
) -> tuple[Path, Path]:
    """Time-mean bias (prediction − truth) per method on one shared symmetric colour scale."""
    if not predictions:
        raise ValueError("no predictions to plot")
    mean_dims = [d for d in truth.dims if d not in ("lat", "lon")]
    biases = {
        name: (pred.assign_coords(lat=truth["lat"], lon=truth["lon"]) - truth).mean(mean_dims)
        for name, pred in predictions.items()
    }
    return draw_bias_maps(biases, truth, path)


def draw_bias_maps(biases: Mapping[str, xr.DataArray], like: xr.DataArray,
                   path: str | os.PathLike) -> tuple[Path, Path]:
    """The bias-map figure from per-method time-mean bias fields (lat, lon)."""
    if not biases:
        raise ValueError("no predictions to plot")
    lim = _symmetric_limit(*biases.values())
    n = len(biases)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols + 1, 3.8 * rows),
                             constrained_layout=True, squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for ax, (name, b) in zip(axes.ravel(), biases.items(), strict=False):
        mesh = _map(ax, b.transpose("lat", "lon"), f"{name} (mean {float(b.mean()):+.3g})",
                    cmap=_ERROR_CMAP, vmin=-lim, vmax=lim)
    fig.colorbar(mesh, ax=list(axes.ravel()[:n]), shrink=0.8,
                 label=f"mean bias ({_units(like)})")
    fig.suptitle(f"Time-mean bias, prediction − truth: {_label(like)}")
    return _save(fig, path)


def plot_rank_histograms(ranks: Mapping[str, np.ndarray],
                         path: str | os.PathLike) -> tuple[Path, Path]:
    """Rank histograms of an ensemble, one panel per variable: the frequency of the truth's
    rank among the M members (0..M). Flat (dashed line) = reliable spread; U-shaped =
    over-confident (spread too small); dome-shaped = over-dispersive."""
    n = len(ranks)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(4.6 * max(n, 1), 3.8),
                             constrained_layout=True, squeeze=False)
    for ax, (var, counts) in zip(axes[0], ranks.items(), strict=False):
        counts = np.asarray(counts, dtype=float)
        freq = counts / counts.sum() if counts.sum() else counts
        ax.bar(np.arange(len(freq)), freq, color="tab:blue", width=0.85)
        ax.axhline(1 / len(freq), color="black", ls="--", lw=1, label="flat (reliable)")
        name = BY_SHORT_NAME[var].long_name.replace("_", " ") if var in BY_SHORT_NAME else var
        ax.set_title(f"{name} ({len(freq) - 1} members)")
        ax.set_xlabel("rank of the truth among the members")
        ax.set_ylabel("relative frequency")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Rank histograms of the ensemble (test period)")
    return _save(fig, path)


def plot_skill(table: pd.DataFrame, model: str, path: str | os.PathLike) -> tuple[Path, Path]:
    """RMSE of every method relative to the best baseline, one panel per variable: bars below
    1 beat it. The model's bar is highlighted (red when it does not beat the best baseline)."""
    rmse = table[table["metric"] == "rmse"]
    variables = list(dict.fromkeys(rmse["variable"]))
    fig, axes = plt.subplots(1, len(variables), figsize=(4.8 * len(variables), 4),
                             constrained_layout=True, squeeze=False)
    for ax, var in zip(axes[0], variables, strict=True):
        part = rmse[rmse["variable"] == var].set_index("method")["value"]
        others = part.drop(model, errors="ignore").dropna()
        if others.empty or model not in part:
            ax.axis("off")
            continue
        best = others.min()
        ratio = part / best
        colours = ["0.6"] * len(ratio)
        for i, m in enumerate(ratio.index):
            if m == model:
                colours[i] = "tab:green" if ratio[m] < 1 else "tab:red"
        ax.barh(list(ratio.index)[::-1], ratio.values[::-1], color=colours[::-1])
        ax.axvline(1, color="black", lw=1, ls="--")
        ax.set_xlabel(f"RMSE / RMSE of the best baseline ({others.idxmin()})")
        ax.set_title(var)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Skill against the baselines (RMSE ratio; < 1 beats the best baseline)")
    return _save(fig, path)


def plot_seams(
    errors: pd.DataFrame,
    path: str | os.PathLike,
    halo_fine: int | None = None,
    max_distance: int | None = None,
) -> tuple[Path, Path]:
    """TILES seam check: RMSE against distance to the nearest inner tile border (fine pixels).

    `errors` is `seams.seam_errors`' table (setting, variable, distance, rmse, n); one panel per
    variable, one line per setting (trained halo, halo 0, whole domain). A flat line means no
    seam; a rise towards distance 0 means tiles lack context at their borders. `halo_fine`
    marks the trained halo width. An empty table (one tile: no borders) gives a figure that
    says there are no seams.
    """
    if errors.empty:
        # one tile (div 1 x 1, not wrapping round the globe): nothing to check, say so
        return _save(_message_figure("TILES seam check: no seams", NO_SEAMS_NOTE), path)
    variables = list(dict.fromkeys(errors["variable"]))
    n = len(variables)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), constrained_layout=True,
                             squeeze=False)
    for ax, var in zip(axes[0], variables, strict=True):
        part = errors[errors["variable"] == var]
        if max_distance is not None:
            part = part[part["distance"] <= max_distance]
        for setting, line in part.groupby("setting", sort=False):
            ax.plot(line["distance"], line["rmse"], marker="o", ms=3, lw=1.4, label=setting)
        if halo_fine:
            ax.axvline(halo_fine, color="0.5", ls=":", lw=1)
            ax.text(halo_fine, 0.02, f" trained halo\n ({halo_fine} px)", color="0.4",
                    fontsize=8, transform=ax.get_xaxis_transform())
        units = BY_SHORT_NAME[var].units if var in BY_SHORT_NAME else ""
        label = BY_SHORT_NAME[var].long_name.replace("_", " ") if var in BY_SHORT_NAME else var
        ax.set_xlabel("distance to nearest tile border (fine pixels)")
        ax.set_ylabel(f"RMSE ({units})" if units else "RMSE")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("TILES seam check: error vs distance to tile borders")
    return _save(fig, path)


NO_SEAMS_NOTE = [
    "The tiling has a single tile (tiles.div_lat = tiles.div_lon = 1) and the domain",
    "does not wrap round the globe: there are no tile borders, so there are no seams.",
    "Nothing to check; the seam-check table is empty.",
]


def _message_figure(title: str, lines: list[str]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.axis("off")
    ax.set_title(title, fontsize=13, loc="left")
    ax.text(0.0, 0.85, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=9,
            transform=ax.transAxes, wrap=True)
    return fig


NO_BENCHMARKS_HINT = [
    "No benchmark results yet. The benchmark rules write them, e.g.",
    "  snakemake --cores all results/benchmarks/demo/tiles_scaling.json",
    "  snakemake --cores all bench      (the paper-size set)",
    "or run a script by hand: python benchmarks/bench_tiles_scaling.py",
    "(evaluate.benchmarks names the folder the scaling figure reads).",
]


def _scaling_pair(axes: tuple, data: pd.DataFrame, key: str, draw, empty: str,
                  xlabel: str) -> bool:
    """A throughput panel and an efficiency panel over one x `key` (processes or domain size):
    `draw(series, rows, efficiency)` per benchmark series, sorted by `key`, then the ideal
    (100%) line and a legend; with no such run a note instead. True when something was drawn."""
    from downscaler.evaluation.benchmarks import scaling_efficiency

    if data.empty:
        for ax in axes:
            ax.text(0.5, 0.5, empty, ha="center", transform=ax.transAxes)
    else:
        eff = scaling_efficiency(data, key)
        for series, g in data.groupby("series", sort=False):
            g = g.sort_values(key)
            draw(series, g, eff[g.index])
        axes[1].axhline(100, color="0.5", ls="--", lw=0.8)
        axes[0].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    return not data.empty


def plot_scaling(
    bench: pd.DataFrame,
    path: str | os.PathLike,
    problems: list[str] | None = None,
    results_dir: str | None = None,
    machines: list[str] | None = None,
) -> tuple[Path, Path]:
    """Strong scaling (throughput and efficiency vs processes / GPUs) and domain-size scaling
    (grid points per second and efficiency vs domain size), one line per benchmark series.

    `bench` is `benchmarks.load_benchmarks`' table. Ideal linear scaling is drawn dashed. With
    nothing to draw, the figure says so and how to produce benchmark results. `machines` (the
    JSON's machine labels) is printed on the figure: which machine produced the numbers.
    """
    problems = list(problems or [])
    usable = bench[bench["throughput"].notna()] if not bench.empty else bench
    by_proc = usable[usable["processes"].notna()] if not usable.empty else usable
    by_dom = usable[usable["domain"].notna()] if not usable.empty else usable
    if by_proc.empty and by_dom.empty:
        lines = list(NO_BENCHMARKS_HINT)
        if not bench.empty:
            lines = [f"{len(bench)} benchmark record(s) found, but none has a throughput (or",
                     "step time) together with a process count or a domain size."] + lines[1:]
        if results_dir is not None:
            lines.append(f"(looked for *.json in {results_dir})")
        fig = _message_figure("Scaling: no benchmark results to plot",
                              lines + [f"! {p}" for p in problems])
        return _save(fig, path)

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    (ax_tp, ax_eff), (ax_dom, ax_deff) = axes

    def by_processes(series: str, g: pd.DataFrame, eff: pd.Series) -> None:
        line, = ax_tp.loglog(g["processes"], g["throughput"], marker="o", label=series)
        n0, t0 = g["processes"].iloc[0], g["throughput"].iloc[0]
        ax_tp.loglog(g["processes"], t0 * g["processes"] / n0, ls="--", lw=0.8,
                     color=line.get_color())
        ax_eff.plot(g["processes"], 100 * eff, marker="o", label=series)

    if _scaling_pair((ax_tp, ax_eff), by_proc, "processes", by_processes,
                     "no runs with a process / GPU count", "processes / GPUs"):
        ax_eff.set_xscale("log", base=2)
        unit = by_proc["throughput_unit"].mode().iloc[0] or "samples/s"
        ax_tp.set_ylabel(f"throughput ({unit})")
        ax_eff.set_ylabel("parallel efficiency (%; strong or weak per series)")
        ax_tp.set_title("Throughput vs processes (dashed: ideal)")
        ax_eff.set_title("Efficiency vs processes")

    def by_domain(series: str, g: pd.DataFrame, eff: pd.Series) -> None:
        ax_dom.loglog(g["domain"], g["throughput"] * g["domain"], marker="o", label=series)
        ax_deff.semilogx(g["domain"], 100 * eff, marker="o", label=series)

    if _scaling_pair((ax_dom, ax_deff), by_dom, "domain", by_domain,
                     "no runs with a domain size", "domain size (grid points)"):
        ax_dom.set_ylabel("grid points per second")
        ax_deff.set_ylabel("efficiency vs smallest domain (%)")
        ax_dom.set_title("Throughput vs domain size")
        ax_deff.set_title("Efficiency vs domain size (100%: cost linear in area)")
    title = f"Scaling ({results_dir or 'benchmark results'})"
    if problems:
        title += f" — {len(problems)} file(s) skipped"
    fig.suptitle(title)
    fig.text(0.01, -0.01, "measured on " + (" / ".join(machines or []) or "an unrecorded machine"),
             fontsize=8, ha="left", va="top", color="0.3")
    return _save(fig, path)
