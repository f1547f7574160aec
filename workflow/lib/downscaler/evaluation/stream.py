"""Streaming scores: every metric of `scores.METRICS` from one pass over time chunks.

Memory is bounded by one time chunk plus per-pixel sums (bias maps, 2-D power spectra),
whatever the length of the test period. The numbers equal `scores.score_table` on the whole
period (tested), because every metric reduces to sums over pixels and times:
- rmse, rmse_latw, bias, mae, pearson_r, r2, psnr: sums of errors and of (shifted) values and
  their products over the pixels where prediction and truth are both valid;
- ssim: the mean over time steps of the per-step SSIM;
- lsd: from the time-mean 2-D power spectra;
- tail RMSE and the SSIM/PSNR data range need the truth's quantiles and range over the whole
  period first: `summarise_truth` finds them exactly in three cheap passes over the truth only
  (range and count; a 65,536-bin histogram; the values inside the bins holding the order
  statistics).
Missing truth (NaN, e.g. a land-only product) is excluded everywhere; for the spectra the
prediction is masked where the truth is missing and missing pixels are filled with the image's
mean. `missing_fraction` is the fraction of valid truth pixels where the method has no value
(e.g. the model's output under missing coarse inputs).

Ensembles (a `member` dimension): the deterministic scores use the ensemble mean, and
`EnsembleScores` adds CRPS (the fair ensemble estimator of scoringrules; for one member the
standard estimator, which equals the MAE), the spread-skill ratio and a rank histogram.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import xarray as xr

from downscaler.evaluation import metrics as M
from downscaler.evaluation.scores import LOG_PRECIP, METRICS, TAIL_QUANTILES

HIST_BINS = 65_536
MISSING_FRACTION = "missing_fraction"


def score_variables(targets: list[str], log_precip: bool = True) -> dict[str, tuple]:
    """Scored variable -> (source target, transform): each target as is, and tp in log1p."""
    out: dict[str, tuple] = {v: (v, None) for v in targets}
    if log_precip and "tp" in targets:
        out[LOG_PRECIP] = ("tp", lambda a: np.log1p(np.clip(a, 0, None)))
    return out


def _values(ds: xr.Dataset, spec: tuple) -> np.ndarray:
    """[time, lat, lon] float64 values of one scored variable of a chunk."""
    name, transform = spec
    values = ds[name].transpose("time", "lat", "lon").values.astype("float64")
    return transform(values) if transform else values


def _order_statistic_bins(lo: float, hi: float, n_bins: int,
                          values: np.ndarray) -> np.ndarray:
    scaled = (values - lo) / (hi - lo) * n_bins
    return np.clip(np.floor(scaled), 0, n_bins - 1).astype(np.int64)


def _varying_finite_values(chunks: Callable[[], Iterable[xr.Dataset]],
                           variables: dict[str, tuple], summary: dict[str, dict]) -> Iterator:
    """(variable, its summary, finite values of one chunk) over a fresh pass of `chunks()`,
    skipping constant variables (their quantiles are known from the range alone)."""
    for chunk in chunks():
        for v, spec in variables.items():
            s = summary[v]
            if s["max"] == s["min"]:
                continue
            x = _values(chunk, spec)
            yield v, s, x[np.isfinite(x)]


def summarise_truth(chunks: Callable[[], Iterable[xr.Dataset]], variables: dict[str, tuple],
                    quantiles: tuple[float, ...] = TAIL_QUANTILES) -> dict[str, dict]:
    """Per scored variable: n (valid pixel-times), min, max, mean and the exact `quantiles`
    (numpy's linear interpolation, as `truth.quantile` over all dims) of the truth.

    `chunks()` must return a fresh iterator over the truth's time chunks each call (three
    passes); only one chunk and a histogram are in memory at a time.
    """
    out = {v: {"n": 0, "min": np.inf, "max": -np.inf, "sum": 0.0} for v in variables}
    for chunk in chunks():
        for v, spec in variables.items():
            x = _values(chunk, spec)
            x = x[np.isfinite(x)]
            if x.size:
                s = out[v]
                s["n"] += x.size
                s["min"], s["max"] = min(s["min"], x.min()), max(s["max"], x.max())
                s["sum"] += x.sum()
    wanted: dict[str, dict[int, float | None]] = {}
    for v, s in out.items():
        if s["n"] == 0:
            raise ValueError(f"the truth has no valid value of {v} in the test period")
        s["mean"] = s["sum"] / s["n"]
        positions = {q: q * (s["n"] - 1) for q in quantiles}
        s["positions"] = positions
        ranks = {int(np.floor(p)) for p in positions.values()}
        ranks |= {min(r + 1, s["n"] - 1) for r in ranks}
        wanted[v] = dict.fromkeys(sorted(ranks))
        if s["max"] == s["min"]:
            wanted[v] = dict.fromkeys(wanted[v], float(s["min"]))
    # pass 2: which histogram bin holds each wanted order statistic
    hist = {v: np.zeros(HIST_BINS, np.int64) for v in variables}
    for v, s, x in _varying_finite_values(chunks, variables, out):
        hist[v] += np.bincount(_order_statistic_bins(s["min"], s["max"], HIST_BINS, x),
                               minlength=HIST_BINS)
    bins: dict[str, dict[int, tuple[int, int]]] = {}
    for v in variables:
        cum = np.cumsum(hist[v])
        bins[v] = {}
        for rank in wanted[v]:
            b = int(np.searchsorted(cum, rank, side="right"))
            bins[v][rank] = (b, int(cum[b - 1]) if b else 0)  # bin and ranks before it
    # pass 3: the distinct values (with counts) inside those bins give the exact statistics
    found: dict[str, dict[int, dict]] = {v: {} for v in variables}
    for v, s, x in _varying_finite_values(chunks, variables, out):
        idx = _order_statistic_bins(s["min"], s["max"], HIST_BINS, x)
        for b in {b for b, _ in bins[v].values()}:
            vals, counts = np.unique(x[idx == b], return_counts=True)
            acc = found[v].setdefault(b, {})
            for val, c in zip(vals.tolist(), counts.tolist(), strict=True):
                acc[val] = acc.get(val, 0) + c
    for v, s in out.items():
        for rank, (b, before) in bins[v].items():
            if wanted[v][rank] is not None:
                continue
            acc = found[v][b]
            vals = np.array(sorted(acc))
            cum = np.cumsum([acc[val] for val in vals])
            wanted[v][rank] = float(vals[np.searchsorted(cum, rank - before, side="right")])
        s["quantiles"] = {}
        for q, pos in s["positions"].items():
            lo = int(np.floor(pos))
            hi = min(lo + 1, s["n"] - 1)
            a, b = wanted[v][lo], wanted[v][hi]
            s["quantiles"][q] = a + (pos - lo) * (b - a)
        del s["positions"]
    return out


class _Sums:
    """Running sums of one (method, scored variable)."""

    def __init__(self, shape: tuple[int, int], quantiles) -> None:
        self.n = self.se = self.ae = self.e = self.wse = self.w = 0.0
        self.sp = self.st = self.spp = self.stt = self.spt = 0.0
        self.missing = self.truth_valid = 0
        self.tail = {q: [0.0, 0] for q in quantiles}
        self.ssim: list[float] = []
        self.power = np.zeros(shape)
        self.images = 0
        self.error_sum = np.zeros(shape)
        self.error_n = np.zeros(shape)


class StreamingScores:
    """Accumulate `scores.METRICS` for every method and scored variable, chunk by chunk.

    `summary` is `summarise_truth`'s result for the same `variables` (`score_variables`).
    Call `add(truth_chunk, {method: prediction_chunk})` for each chunk, then `table()`.
    """

    def __init__(self, variables: dict[str, tuple], summary: dict[str, dict],
                 lat: np.ndarray, lon: np.ndarray,
                 quantiles: tuple[float, ...] = TAIL_QUANTILES) -> None:
        self.variables, self.summary, self.quantiles = variables, summary, quantiles
        self.lat, self.lon = lat, lon
        self.shape = (len(lat), len(lon))
        w = np.cos(np.deg2rad(np.asarray(lat, dtype="float64")))
        self.weights = np.broadcast_to((w / w.mean())[:, None], self.shape)
        self.sums: dict[tuple[str, str], _Sums] = {}
        self.truth_power = {v: np.zeros(self.shape) for v in variables}
        self.truth_images = dict.fromkeys(variables, 0)

    def _sums(self, method: str, var: str) -> _Sums:
        key = (method, var)
        if key not in self.sums:
            self.sums[key] = _Sums(self.shape, self.quantiles)
        return self.sums[key]

    def add(self, truth: xr.Dataset, predictions: dict[str, xr.Dataset]) -> None:
        for var, spec in self.variables.items():
            t = _values(truth, spec)
            t_ok = np.isfinite(t)
            self.truth_power[var] += M.power2d_sum(_filled(t))
            self.truth_images[var] += len(t)
            s_info = self.summary[var]
            shift, data_range = s_info["mean"], _range(s_info)
            for method, pred in predictions.items():
                if spec[0] not in pred:
                    continue  # this method cannot predict this target
                p = _values(pred, spec)
                s = self._sums(method, var)
                ok = t_ok & np.isfinite(p)
                s.truth_valid += int(t_ok.sum())
                s.missing += int((t_ok & ~np.isfinite(p)).sum())
                e = np.where(ok, p - t, 0.0)
                se = e * e
                s.n += ok.sum()
                s.e += e.sum()
                s.se += se.sum()
                s.ae += np.abs(e).sum()
                w = np.where(ok, self.weights, 0.0)
                s.w += w.sum()
                s.wse += (w * se).sum()
                ps, ts = np.where(ok, p - shift, 0.0), np.where(ok, t - shift, 0.0)
                s.sp += ps.sum()
                s.st += ts.sum()
                s.spp += (ps * ps).sum()
                s.stt += (ts * ts).sum()
                s.spt += (ps * ts).sum()
                for q in self.quantiles:
                    tail = ok & (t > s_info["quantiles"][q])
                    s.tail[q][0] += se[tail].sum()
                    s.tail[q][1] += int(tail.sum())
                s.ssim += M.ssim_images(p, t, data_range)
                s.power += M.power2d_sum(_filled(np.where(t_ok, p, np.nan)))
                s.images += len(p)
                s.error_sum += e.sum(axis=0)
                s.error_n += ok.sum(axis=0)

    def spectrum(self, method: str | None, var: str) -> tuple[xr.DataArray, xr.DataArray]:
        """(wavenumber, power) of the truth (method None) or a method, time-mean so far."""
        if method is None:
            power, n = self.truth_power[var], self.truth_images[var]
        else:
            s = self.sums[(method, var)]
            power, n = s.power, s.images
        return M.radial_spectrum(power / max(n, 1), xr.DataArray(self.lat),
                                 xr.DataArray(self.lon))

    def bias_map(self, method: str, var: str) -> np.ndarray:
        s = self.sums[(method, var)]
        with np.errstate(invalid="ignore", divide="ignore"):
            return s.error_sum / s.error_n

    def methods(self) -> list[str]:
        return list(dict.fromkeys(m for m, _ in self.sums))

    def values(self, method: str, var: str) -> dict[str, float]:
        """Every metric of METRICS (and missing_fraction) for one method and variable."""
        s = self.sums[(method, var)]
        n = s.n
        nan = float("nan")
        with np.errstate(invalid="ignore", divide="ignore"):
            mse = s.se / n if n else nan
            cov = s.spt - s.sp * s.st / n if n else nan
            var_p = s.spp - s.sp**2 / n if n else nan
            var_t = s.stt - s.st**2 / n if n else nan
            data_range = _range(self.summary[var])
            out = {
                "rmse": float(np.sqrt(mse)),
                "rmse_latw": float(np.sqrt(s.wse / s.w)) if s.w else nan,
                "bias": s.e / n if n else nan,
                "mae": s.ae / n if n else nan,
                "pearson_r": float(cov / np.sqrt(var_p * var_t)),
                "r2": float(1 - s.se / var_t),
                "ssim": float(np.mean(s.ssim)) if s.ssim else nan,
                "psnr": (float(10 * np.log10(data_range**2 / mse)) if mse > 0 else
                         float("inf")),
            }
            for q in self.quantiles:
                sse, count = s.tail[q]
                out[f"rmse_q{100 * q:.2f}"] = float(np.sqrt(sse / count)) if count else nan
        _, pp = self.spectrum(method, var)
        _, pt = self.spectrum(None, var)
        out["lsd"] = float(M.lsd_from_spectra(pp, pt))
        out[MISSING_FRACTION] = s.missing / s.truth_valid if s.truth_valid else nan
        return out

    def table(self) -> pd.DataFrame:
        """Tidy (method, variable, metric, value) rows, in METRICS order, then missing_fraction."""
        rows = []
        for method, var in self.sums:
            values = self.values(method, var)
            for name in [*METRICS, MISSING_FRACTION]:
                rows.append({"method": method, "variable": var, "metric": name,
                             "value": float(values[name])})
        return pd.DataFrame(rows, columns=["method", "variable", "metric", "value"])


def _range(summary: dict) -> float:
    """SSIM/PSNR data range: the truth's max - min (1 for a constant truth), as metrics does."""
    r = summary["max"] - summary["min"]
    return float(r) if np.isfinite(r) and r > 0 else 1.0


def _filled(images: np.ndarray) -> np.ndarray:
    """Missing pixels of each image set to that image's mean (0 for an all-missing image)."""
    ok = np.isfinite(images)
    if ok.all():
        return images
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(ok, images, 0).sum(axis=(-2, -1)) / ok.sum(axis=(-2, -1))
    return np.where(ok, images, np.nan_to_num(means)[:, None, None])


class EnsembleScores:
    """CRPS, spread-skill ratio and rank histogram of an ensemble forecast, chunk by chunk.

    - CRPS: `scoringrules.crps_ensemble(..., estimator="fair")` (unbiased for the CRPS of the
      distribution the members are drawn from); with one member the standard ("nrg")
      estimator, which is |x - y|, so the CRPS equals the MAE.
    - spread-skill ratio: sqrt((M + 1) / M) * sqrt(mean ensemble variance (ddof 1)) / RMSE of
      the ensemble mean (Fortin et al. 2014); 1 means a reliable spread, < 1 over-confident.
    - rank histogram: the truth's rank among the M members (0..M), ties split at random (fixed
      seed); flat means reliable, U-shaped over-confident, dome-shaped over-dispersive.
    Pixels where the truth or any member is missing are left out.
    """

    def __init__(self, variables: dict[str, tuple], members: int, seed: int = 0) -> None:
        self.variables, self.members = variables, members
        self.rng = np.random.default_rng(seed)
        self.n = dict.fromkeys(variables, 0)
        self.crps = dict.fromkeys(variables, 0.0)
        self.var_sum = dict.fromkeys(variables, 0.0)
        self.mean_se = dict.fromkeys(variables, 0.0)
        self.ranks = {v: np.zeros(members + 1, np.int64) for v in variables}

    def add(self, truth: xr.Dataset, ensemble: xr.Dataset) -> None:
        import scoringrules

        for var, (name, transform) in self.variables.items():
            if name not in ensemble:
                continue
            t = _values(truth, (name, transform))
            f = ensemble[name].transpose("time", "member", "lat", "lon").values.astype("float64")
            if transform:
                f = transform(f)
            ok = np.isfinite(t) & np.isfinite(f).all(axis=1)
            obs, fct = t[ok], np.moveaxis(f, 1, -1)[ok]  # [n], [n, M]
            if not obs.size:
                continue
            estimator = "fair" if self.members > 1 else "nrg"
            self.crps[var] += float(np.sum(scoringrules.crps_ensemble(obs, fct,
                                                                       estimator=estimator)))
            if self.members > 1:
                self.var_sum[var] += float(fct.var(axis=1, ddof=1).sum())
            self.mean_se[var] += float(((fct.mean(axis=1) - obs) ** 2).sum())
            below = (fct < obs[:, None]).sum(axis=1)
            ties = (fct == obs[:, None]).sum(axis=1)
            rank = below + np.floor(self.rng.random(obs.size) * (ties + 1)).astype(int)
            self.ranks[var] += np.bincount(rank, minlength=self.members + 1)
            self.n[var] += obs.size

    def table(self, method: str) -> pd.DataFrame:
        rows = []
        m = self.members
        for var in self.variables:
            n = self.n[var]
            if not n:
                continue
            rmse = np.sqrt(self.mean_se[var] / n)
            spread = np.sqrt(self.var_sum[var] / n)
            ssr = np.sqrt((m + 1) / m) * spread / rmse if m > 1 and rmse > 0 else np.nan
            for metric, value in (("crps", self.crps[var] / n), ("spread", spread),
                                  ("spread_skill_ratio", ssr), ("members", m)):
                rows.append({"method": method, "variable": var, "metric": metric,
                             "value": float(value)})
        return pd.DataFrame(rows, columns=["method", "variable", "metric", "value"])


def time_chunks(ds: xr.Dataset, time_chunk: int) -> Iterator[xr.Dataset]:
    """`ds` loaded `time_chunk` steps at a time."""
    for t0 in range(0, ds.sizes["time"], time_chunk):
        yield ds.isel(time=slice(t0, t0 + time_chunk)).load()
