"""Skill metrics for downscaled fields: small, documented, composable functions over xarray.

Every metric takes `(pred, truth, ...)` DataArrays with dims (time, lat, lon) (other leading
dims are allowed) and returns an `xr.DataArray` reduced over `dims`, by default every one of
time/lat/lon that is present. Missing values (NaN in either input) are skipped, so a masked
region (e.g. ocean for a land-only product) does not poison the score. Definitions follow
WeatherBench 2 and the downscaling literature; each docstring states its formula so that a
number in a table can be traced to one line of code.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import xarray as xr
from scipy import ndimage

SPACE_TIME = ("time", "lat", "lon")
SPATIAL = ("lat", "lon")

# SSIM constants of Wang et al. (2004), the values every SSIM implementation defaults to.
SSIM_SIGMA = 1.5
SSIM_WIN = 11
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _dims(x: xr.DataArray, dims: Sequence[Hashable] | Hashable | None) -> list[Hashable]:
    """Default reduction dims: those of time/lat/lon present in `x`."""
    if dims is None:
        return [d for d in SPACE_TIME if d in x.dims]
    if isinstance(dims, str):
        return [dims]
    return list(dims)


def _valid(pred: xr.DataArray, truth: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """Mask both inputs where either is missing, so sums and means cover the same pixels."""
    ok = pred.notnull() & truth.notnull()
    return pred.where(ok), truth.where(ok)


def lat_weights(lat: xr.DataArray) -> xr.DataArray:
    """cos(latitude) normalised to mean 1 over the grid: each cell weighs as its area."""
    w = np.cos(np.deg2rad(lat))
    return w / w.mean()


def mse(pred: xr.DataArray, truth: xr.DataArray, dims=None) -> xr.DataArray:
    """Mean squared error: mean((pred - truth)^2)."""
    return ((pred - truth) ** 2).mean(_dims(truth, dims))


def rmse(
    pred: xr.DataArray, truth: xr.DataArray, dims=None, lat_weighted: bool = False
) -> xr.DataArray:
    """Root mean squared error: sqrt(mean(w * (pred - truth)^2)).

    w = 1, or with `lat_weighted` w = cos(lat) / mean(cos(lat)), so that on a global grid each
    cell counts in proportion to its area (WeatherBench 2 convention). On a small regional grid
    the two numbers are close; both are reported because papers rarely say which they used.
    """
    d = _dims(truth, dims)
    se = (pred - truth) ** 2
    if not lat_weighted:
        return np.sqrt(se.mean(d))
    if "lat" not in truth.dims:
        raise ValueError("lat_weighted=True needs a 'lat' dimension")
    # xarray's weighted mean divides by the summed weights of the non-missing cells only.
    return np.sqrt(se.weighted(lat_weights(truth["lat"]).fillna(0)).mean(d))


def bias(pred: xr.DataArray, truth: xr.DataArray, dims=None) -> xr.DataArray:
    """Mean bias (mean error): mean(pred - truth); positive means the prediction is too high."""
    return (pred - truth).mean(_dims(truth, dims))


def mae(pred: xr.DataArray, truth: xr.DataArray, dims=None) -> xr.DataArray:
    """Mean absolute error: mean(|pred - truth|)."""
    return abs(pred - truth).mean(_dims(truth, dims))


def pearson_r(pred: xr.DataArray, truth: xr.DataArray, dims=None) -> xr.DataArray:
    """Pearson correlation: cov(pred, truth) / (std(pred) std(truth)), pooled over `dims`.

    Insensitive to bias and scale: pred = a * truth + b has r = 1 for any a > 0, b. ORBIT-2
    reports this number under the name "R^2"; see `r2` for the coefficient of determination.
    """
    d = _dims(truth, dims)
    p, t = _valid(pred, truth)
    pa, ta = p - p.mean(d), t - t.mean(d)
    return (pa * ta).sum(d) / np.sqrt((pa**2).sum(d) * (ta**2).sum(d))


def r2(pred: xr.DataArray, truth: xr.DataArray, dims=None) -> xr.DataArray:
    """Coefficient of determination: 1 - SS_res / SS_tot.

    SS_res = sum((truth - pred)^2), SS_tot = sum((truth - mean(truth))^2). This is NOT the square
    of `pearson_r` (nor Pearson r, which ORBIT-2 labels "R^2"): any bias or wrong amplitude
    lowers it, and it is negative when the prediction is worse than the truth's own mean.
    """
    d = _dims(truth, dims)
    p, t = _valid(pred, truth)
    ss_res = ((t - p) ** 2).sum(d)
    ss_tot = ((t - t.mean(d)) ** 2).sum(d)
    return 1 - ss_res / ss_tot


def _data_range(truth: xr.DataArray, data_range: float | None) -> float:
    """Dynamic range for SSIM/PSNR: given, else truth max - min (1 for a constant field)."""
    if data_range is None:
        data_range = float(truth.max() - truth.min())
        if not np.isfinite(data_range) or data_range <= 0:
            data_range = 1.0  # a constant truth: any positive scale keeps SSIM/PSNR defined
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    return float(data_range)


def _as_images(x: xr.DataArray) -> np.ndarray:
    """Stack every non-spatial dim into one leading axis: (n, lat, lon) float64."""
    other = [d for d in x.dims if d not in SPATIAL]
    arr = x.transpose(*other, "lat", "lon").values.astype(np.float64)
    return arr.reshape(-1, arr.shape[-2], arr.shape[-1])


def ssim(pred: xr.DataArray, truth: xr.DataArray, data_range: float | None = None) -> xr.DataArray:
    """Structural similarity (Wang et al. 2004), computed per time step in 2-D, averaged.

    Local statistics use a Gaussian window (sigma 1.5, truncated to 11 x 11, reflecting at
    the edges); C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = `data_range` (default: truth max - min
    over the whole array, one scale for all time steps so days are comparable):

        SSIM = (2 mu_p mu_t + C1)(2 cov_pt + C2) / ((mu_p^2 + mu_t^2 + C1)(var_p + var_t + C2))

    The map is averaged after cropping the 5-pixel border the window cannot cover (as
    scikit-image does, to 1e-10: tested), unless the image is too small to crop. 1 means
    identical. Pixels missing in either field are set to the truth image's mean in both before
    filtering and left out of the average, so a masked region (a land-only product) does not
    blank the whole image.
    """
    L = _data_range(truth, data_range)
    scores = ssim_images(_as_images(pred), _as_images(truth), L)
    return xr.DataArray(float(np.mean(scores)), attrs={"long_name": "SSIM", "units": "1"})


def ssim_images(pred: np.ndarray, truth: np.ndarray, data_range: float) -> list[float]:
    """SSIM of each (lat, lon) image pair of two [n, lat, lon] stacks (see `ssim`), so that a
    streaming evaluation can average over time chunk by chunk."""
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    radius = (SSIM_WIN - 1) // 2

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, SSIM_SIGMA, mode="reflect", radius=radius)

    scores = []
    for p, t in zip(pred, truth, strict=True):
        valid = np.isfinite(p) & np.isfinite(t)
        if not valid.any():
            scores.append(float("nan"))
            continue
        if not valid.all():
            # masked pixels (e.g. sea for a land-only product): both set to the truth's mean, so
            # a mask does not blank every window it touches, and left out of the average below
            fill = float(t[valid].mean())
            p, t = np.where(valid, p, fill), np.where(valid, t, fill)
        mp, mt = blur(p), blur(t)
        vp = blur(p * p) - mp**2
        vt = blur(t * t) - mt**2
        cov = blur(p * t) - mp * mt
        smap = ((2 * mp * mt + c1) * (2 * cov + c2)) / ((mp**2 + mt**2 + c1) * (vp + vt + c2))
        smap = np.where(valid, smap, np.nan)
        if smap.shape[0] > 2 * radius and smap.shape[1] > 2 * radius:
            smap = smap[radius:-radius, radius:-radius]
        scores.append(float(np.nanmean(smap)) if np.isfinite(smap).any() else float("nan"))
    return scores


def psnr(pred: xr.DataArray, truth: xr.DataArray, data_range: float | None = None) -> xr.DataArray:
    """Peak signal-to-noise ratio in dB: 10 log10(L^2 / MSE), MSE over all pixels and times.

    L = `data_range`, default truth max - min (as for `ssim`). Higher is better; identical
    fields give +inf.
    """
    L = _data_range(truth, data_range)
    err = float(mse(pred, truth))
    with np.errstate(divide="ignore"):
        value = 10 * np.log10(L**2 / err) if err > 0 else np.inf
    return xr.DataArray(value, attrs={"long_name": "PSNR", "units": "dB"})


def tail_rmse(
    pred: xr.DataArray, truth: xr.DataArray, quantile: float, dims=None
) -> xr.DataArray:
    """RMSE over the extremes only: pixels (and times) where truth > its `quantile`.

    The threshold is the truth's quantile pooled over `dims` (by default all of time/lat/lon),
    e.g. 0.6827, 0.9545, 0.9973 (the 1, 2, 3 sigma levels of a normal distribution). It scores
    how well the tail of the distribution (heat extremes, heavy rain) is reproduced.
    """
    if not 0 <= quantile < 1:
        raise ValueError(f"quantile must be in [0, 1), got {quantile}")
    d = _dims(truth, dims)
    threshold = truth.quantile(quantile, dim=d).drop_vars("quantile")
    tail = truth > threshold
    return np.sqrt(((pred - truth) ** 2).where(tail).mean(d))


def _spacing(coord: xr.DataArray) -> float:
    """Grid spacing of a regular 1-D coordinate (1 when it has a single point)."""
    return float(np.abs(np.diff(coord.values)).mean()) if coord.size > 1 else 1.0


def power_spectrum(field: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """Radially averaged 2-D power spectrum over lat/lon, averaged over all other dims (time).

    Per time step: P(kx, ky) = |FFT2(x)|^2 / N^2 (N = nlat * nlon, so that the sum over all modes
    is mean(x^2), Parseval). Wavenumbers are in cycles per degree; modes are binned into annuli
    of width dk = the coarser of the two fundamental frequencies, k = round(|k| / dk) dk, and the
    power is the mean over the modes of each annulus. Only k in [dk, min Nyquist] is kept (the
    zero mode is the mean, not structure; beyond Nyquist an annulus is only partly sampled).
    The returned `power` carries a coordinate `n_modes` (modes per annulus), so
    sum(power * n_modes) is the variance held in the kept annuli. No taper is applied: on
    regional (non-periodic) grids the edges leak some power to high k for every method alike.
    Missing values are filled with the field mean.

    Returns (wavenumber, power), both DataArrays along dim "wavenumber".
    """
    imgs = _as_images(field)
    imgs = np.where(np.isfinite(imgs), imgs, np.nanmean(imgs))
    power2d = power2d_sum(imgs) / len(imgs)
    return radial_spectrum(power2d, field["lat"], field["lon"], field.attrs.get("units"))


def power2d_sum(imgs: np.ndarray) -> np.ndarray:
    """Sum over images of |FFT2(x)|^2 / N^2 for a [n, lat, lon] stack without missing values."""
    nlat, nlon = imgs.shape[-2:]
    return (np.abs(np.fft.fft2(imgs)) ** 2).sum(axis=0) / (nlat * nlon) ** 2


def radial_spectrum(power2d: np.ndarray, lat: xr.DataArray, lon: xr.DataArray,
                    units: str | None = None) -> tuple[xr.DataArray, xr.DataArray]:
    """Radially average a (time-mean) 2-D power spectrum into annuli (see `power_spectrum`)."""
    dlat, dlon = _spacing(lat), _spacing(lon)
    nlat, nlon = power2d.shape
    ky = np.fft.fftfreq(nlat, d=dlat)
    kx = np.fft.fftfreq(nlon, d=dlon)
    kmag = np.hypot(ky[:, None], kx[None, :])
    dk = max(1 / (nlat * dlat), 1 / (nlon * dlon))
    nyquist = min(0.5 / dlat if nlat > 1 else np.inf, 0.5 / dlon if nlon > 1 else np.inf)
    nbins = int(np.floor(nyquist / dk + 1e-9))
    idx = np.rint(kmag / dk).astype(int).ravel()
    counts = np.bincount(idx, minlength=nbins + 1)[1 : nbins + 1]
    sums = np.bincount(idx, weights=power2d.ravel(), minlength=nbins + 1)[1 : nbins + 1]
    k = np.arange(1, nbins + 1) * dk
    with np.errstate(invalid="ignore", divide="ignore"):
        pw = sums / counts
    coords = {"wavenumber": ("wavenumber", k, {"units": "cycles/degree"}),
              "n_modes": ("wavenumber", counts)}
    power = xr.DataArray(
        pw, dims="wavenumber", coords=coords, name="power",
        attrs={"long_name": "radially averaged power per mode",
               **({"units": f"({units})^2"} if units else {})},
    )
    return power["wavenumber"], power


def log_spectral_distance(pred: xr.DataArray, truth: xr.DataArray) -> xr.DataArray:
    """Log-spectral distance in dB: sqrt(mean_k (10 log10(P_pred(k) / P_truth(k)))^2).

    P is `power_spectrum` (radially averaged, time-mean); the mean is over the wavenumber bins
    where both spectra are positive. 0 means the same spectrum; it exposes the smoothing of
    interpolation and MSE-trained models (lost power at high k) that RMSE hides.
    """
    _, pp = power_spectrum(pred)
    _, pt = power_spectrum(truth)
    return lsd_from_spectra(pp, pt)


def lsd_from_spectra(pp: xr.DataArray, pt: xr.DataArray) -> xr.DataArray:
    """Log-spectral distance (dB) between two radially averaged spectra on the same bins."""
    ok = (pp.values > 0) & (pt.values > 0)
    ratio = 10 * np.log10(pp.values[ok] / pt.values[ok])
    value = float(np.sqrt(np.mean(ratio**2))) if ok.any() else np.nan
    return xr.DataArray(value, attrs={"long_name": "log-spectral distance", "units": "dB"})
