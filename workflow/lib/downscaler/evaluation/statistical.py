"""Statistical baselines fitted on the training period: what a statistician does in an afternoon.

- `residual_climatology`: bicubic interpolation of the input plus the training period's mean
  residual (target - bicubic input) at each fine pixel for each (hour of day, month). It corrects
  the systematic fine-scale pattern (lapse rate over orography, land-sea contrast, the diurnal
  cycle of both) that interpolation cannot know. Only for targets that are also inputs.
- `mos`: per-pixel linear regression (model output statistics) of the target on all the
  bicubic-interpolated inputs plus an intercept, by least squares over the training period.
  Inputs are centred and scaled (by the first chunk's mean and std) for conditioning; a tiny
  ridge (1e-8 of the mean squared input) keeps pixels with a constant input solvable. A pixel
  with fewer valid training steps than coefficients gets NaN (no fit).

Both are fitted in one streaming pass over the training period (time chunks): memory is one chunk
plus the fitted fields (per target: hours x 12 months x lat x lon residual sums and counts, and
(P+1)^2 x lat x lon normal equations for P inputs), whatever the length of the period. NaN target
pixels (land-only products) and missing inputs are left out of every sum. For a (hour, month)
never seen in training the residual falls back to that hour's mean over all months, then to the
mean over everything.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from downscaler.evaluation.baselines import NONNEGATIVE, upsample
from downscaler.settings import schema_defaults

INTERPOLATION = "bicubic"
STATISTICAL = ("residual_climatology", "mos")
# Ridge added to the diagonal of each pixel's normal equations, relative to their scale.
RIDGE = 1e-8


def interpolate_inputs(coarse: xr.Dataset, inputs: list[str], fine_lat, fine_lon) -> xr.Dataset:
    """The inputs on the fine grid by bicubic interpolation (the statistical baselines' base)."""
    factor = len(fine_lat) // coarse.sizes["lat"]
    return upsample(coarse[inputs], factor, INTERPOLATION, fine_lat=fine_lat, fine_lon=fine_lon)


def _calendar(time: xr.DataArray) -> tuple[np.ndarray, np.ndarray]:
    return time.dt.hour.values.astype(int), time.dt.month.values.astype(int)


def _design(up: xr.Dataset, inputs: list[str], centre: np.ndarray,
            scale: np.ndarray) -> np.ndarray:
    """[t, P + 1, lat, lon] regressors: an intercept and the scaled interpolated inputs."""
    cols = [(up[v].transpose("time", "lat", "lon").values.astype("float64") - centre[i])
            / scale[i] for i, v in enumerate(inputs)]
    return np.stack([np.ones_like(cols[0]), *cols], axis=1)


def fit_statistical(coarse: xr.Dataset, fine: xr.Dataset, inputs: list[str],
                    targets: list[str],
                    time_chunk: int = schema_defaults("evaluate").time_chunk) -> xr.Dataset:
    """Fit both baselines on `coarse` (inputs) and `fine` (targets) over their common times
    (pass the training period), streaming `time_chunk` steps at a time; returns the fitted
    fields as a Dataset (see `predict_statistical`)."""
    coarse = coarse.sel(time=fine["time"])
    n_time = fine.sizes["time"]
    if n_time == 0:
        raise ValueError("no training time steps to fit the statistical baselines on")
    lat, lon = fine["lat"].values, fine["lon"].values
    shape = (len(lat), len(lon))
    n_terms = len(inputs) + 1
    xtx = {v: np.zeros((*shape, n_terms, n_terms)) for v in targets}
    xty = {v: np.zeros((*shape, n_terms)) for v in targets}
    n_fit = {v: np.zeros(shape) for v in targets}
    res_sum: dict[tuple, dict[str, np.ndarray]] = {}
    res_n: dict[tuple, dict[str, np.ndarray]] = {}
    residual_targets = [v for v in targets if v in inputs]
    centre = scale = None
    for t0 in range(0, n_time, time_chunk):
        window = slice(t0, t0 + time_chunk)
        c = coarse[inputs].isel(time=window).load()
        f = fine[targets].isel(time=window).load()
        up = interpolate_inputs(c, inputs, lat, lon)
        if centre is None:
            centre = np.array([float(up[v].mean()) for v in inputs])
            scale = np.array([float(up[v].std()) for v in inputs])
            centre, scale = np.nan_to_num(centre), np.where(scale > 0, scale, 1.0)
        x = _design(up, inputs, centre, scale)
        x_ok = np.isfinite(x).all(axis=1)
        hours, months = _calendar(f["time"])
        for v in targets:
            y = f[v].transpose("time", "lat", "lon").values.astype("float64")
            ok = x_ok & np.isfinite(y)
            xm = np.where(ok[:, None], x, 0.0)
            ym = np.where(ok, y, 0.0)
            xtx[v] += np.einsum("tpij,tqij->ijpq", xm, xm)
            xty[v] += np.einsum("tpij,tij->ijp", xm, ym)
            n_fit[v] += ok.sum(axis=0)
            if v not in residual_targets:
                continue
            residual = y - up[v].transpose("time", "lat", "lon").values
            for key in set(zip(hours.tolist(), months.tolist(), strict=True)):
                sel = (hours == key[0]) & (months == key[1])
                part = residual[sel]
                res_sum.setdefault(key, {}).setdefault(v, np.zeros(shape))
                res_n.setdefault(key, {}).setdefault(v, np.zeros(shape))
                res_sum[key][v] += np.nansum(part, axis=0)
                res_n[key][v] += np.isfinite(part).sum(axis=0)

    data = {}
    terms = ["intercept", *inputs]
    for v in targets:
        a = xtx[v]
        diag = np.einsum("ijpp->ijp", a).mean(axis=-1, keepdims=True)
        a = a + RIDGE * np.maximum(diag, 1e-300)[..., None] * np.eye(n_terms)
        solvable = n_fit[v] >= n_terms
        coef = np.full((*shape, n_terms), np.nan)
        coef[solvable] = np.linalg.solve(a[solvable], xty[v][solvable][..., None])[..., 0]
        data[f"{v}_mos"] = (("term", "lat", "lon"), np.moveaxis(coef, -1, 0),
                            {"long_name": f"MOS coefficients of {v} (scaled inputs)"})
    hours_seen = sorted({h for h, _ in res_sum})
    for v in residual_targets:
        total = np.zeros((len(hours_seen), 12, *shape))
        count = np.zeros_like(total)
        for (h, m), sums in res_sum.items():
            total[hours_seen.index(h), m - 1] = sums[v]
            count[hours_seen.index(h), m - 1] = res_n[(h, m)][v]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / count
            by_hour = total.sum(axis=1) / count.sum(axis=1)  # fall back to the hour's mean
            overall = total.sum(axis=(0, 1)) / count.sum(axis=(0, 1))
        mean = np.where(count > 0, mean, by_hour[:, None])
        mean = np.where(np.isfinite(mean), mean, overall)
        data[f"{v}_residual"] = (("hour", "month", "lat", "lon"), mean,
                                 {"long_name": f"mean residual {v} - {INTERPOLATION} input"})
        data[f"{v}_residual_all"] = (("lat", "lon"), overall)
        data[f"{v}_residual_count"] = (("hour", "month", "lat", "lon"), count.astype("int32"))
    coords = {"lat": lat, "lon": lon, "term": terms, "hour": np.array(hours_seen, dtype=int),
              "month": np.arange(1, 13), "input": inputs}
    ds = xr.Dataset(data, coords=coords)
    ds["input_centre"] = ("input", centre)
    ds["input_scale"] = ("input", scale)
    ds.attrs.update(inputs=list(inputs), targets=list(targets), interpolation=INTERPOLATION,
                    training_steps=int(n_time),
                    description="statistical baselines: residual_climatology and mos")
    return ds


def predict_statistical(method: str, fitted: xr.Dataset, up: xr.Dataset,
                        targets: list[str]) -> xr.Dataset:
    """One baseline's prediction from the bicubic-interpolated inputs `up` (a time chunk).

    Targets the method cannot predict (residual_climatology of a target that is not an input)
    are left out of the result.
    """
    inputs = list(fitted.attrs["inputs"])
    if isinstance(fitted.attrs["inputs"], str):
        inputs = [fitted.attrs["inputs"]]
    out = {}
    if method == "residual_climatology":
        hours, months = _calendar(up["time"])
        seen = fitted["hour"].values.tolist()
        for v in targets:
            if f"{v}_residual" not in fitted:
                continue
            table = fitted[f"{v}_residual"].values
            fallback = fitted[f"{v}_residual_all"].values
            res = np.stack([table[seen.index(h), m - 1] if h in seen else fallback
                            for h, m in zip(hours, months, strict=True)])
            out[v] = up[v].transpose("time", "lat", "lon") + res
    elif method == "mos":
        x = _design(up, inputs, fitted["input_centre"].values, fitted["input_scale"].values)
        for v in targets:
            coef = fitted[f"{v}_mos"].values  # [P + 1, lat, lon]
            values = np.einsum("tpij,pij->tij", x, coef)
            out[v] = xr.DataArray(values, dims=("time", "lat", "lon"),
                                  coords={"time": up["time"], "lat": up["lat"],
                                          "lon": up["lon"]})
    else:
        raise ValueError(f"unknown statistical baseline {method!r}; choose one of "
                         f"{STATISTICAL}")
    for v in list(out):
        if v in NONNEGATIVE:
            out[v] = out[v].clip(min=0)
        out[v] = out[v].astype("float32")
    ds = xr.Dataset(out)
    ds.attrs["downscaling_method"] = method
    return ds
