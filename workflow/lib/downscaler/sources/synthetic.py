r"""Deterministic synthetic weather on a regular lat-lon grid: the data source of the demo.

Why: the demo must run offline in minutes, yet the downscaling problem it poses must be real:
the fine grid holds detail that coarse data cannot resolve, part of it predictable from the
static fields (orography, land-sea mask) and part of it not (noise). Every number comes from
`numpy.random.default_rng` streams spawned from one `seed` (one stream per component, so asking
for more variables does not change the others), hence the same arguments give bit-identical
arrays. All large-scale fields are sums of separable travelling waves, evaluated per time chunk
with matrix products, so the cost is linear in the output and memory is the output plus one
chunk of temporaries.

Notation: phi latitude, lam longitude (radians), R = 6371 km, t time in seconds since
2000-01-01T00:00 UTC (daily values are evaluated at 12:00 UTC of their day, the middle of the
daily mean), d = t / 86400 s, N(0, 1) independent standard normals, k a wavenumber.

Why the weather-dependent terms (S, T_pool): a statistical baseline (interpolation plus the
train mean residual per pixel, hour and month) learns every fixed per-pixel offset; with only
those, it is unbeatable and the demo proves nothing. Measured on the demo config (throwaway
script, bicubic vs baseline, t2m test RMSE): 1.21 K vs 0.38 K before these terms (90% of the
residual variance was a fixed offset), 1.21 K vs 0.62 K with them (73%), while a per-pixel
linear regression on the local coarse state (t2m anomaly, log rain) reaches 0.47 K: the coarse
weather predicts part of the fine scale, as in real data.

Static fields (`static`)
------------------------
Fractal terrain, spectral synthesis on the grid's physical wavenumbers (cycles/km; the grid
spacing in x is taken at the central latitude, the field is periodic in the domain):

    F = irfft2( (k^2 + k0^2)^(-beta/4) * (N + iN) ),  beta = 2.5, k0 = 1 / 2000 km,
    F normalised to zero mean and unit variance.

Two ridges, Gaussian in the distance D from a random segment (half-length 20-40% of the
domain diagonal, width w = 3-6% of the shorter side but at least 1.5 cells):

    H = F + sum_r a_r exp(-(D_r / w_r)^2),  a_r ~ U(1.5, 2.5).

Sea level: thr = the (1 - f_land) quantile of H, f_land ~ U(0.45, 0.65), so 45-65% of cells
are land. Small-scale roughness is a multiplicative cascade, so sea stays at 0 m and mountains
are rougher than lowlands:

    h0 = max(H - thr, 0),   h = h0 * exp(sigma_r G - sigma_r^2 / 2),  sigma_r = 0.45,

G a unit-variance field with spectrum k^(-3) (amplitude k^-1.5, k in cycles/cell) kept only at
wavelengths shorter than 6 cells, factor (1 - exp(-(k / (1/6))^4)). Finally h is scaled so that
its maximum is h_peak ~ U(2000, 3000) m. Land is H > thr (exactly where orog > 0):

    orog = h * h_peak / max(h)  [m],     lsm = (1 + tanh((H - thr) / w_c)) / 2,

w_c the median change of H between neighbouring cells, so the mask is smooth over about one
cell, lies in 0..1 and lsm > 0.5 exactly on land. The within-4x4-block orography std over
land comes out at roughly 100-300 m (measured over seeds: ~120 m on 256x512 grids, 150-430 m
on 32x64 grids, as max(h) is pinned and larger grids hold more extreme peaks); the roughness
term carries most of it, the smooth fractal alone would leave too little sub-block relief.

Large-scale flow (what u10, v10 and the windward rain enhancement share)
-------------------------------------------------------------------------
Zonal-mean surface wind (m/s), trades, mid-latitude westerlies, polar easterlies (degrees):

    U(phi) = -5 exp(-((|phi| - 15) / 12)^2) + 8 exp(-((|phi| - 48) / 12)^2)
             - 3 exp(-((|phi| - 75) / 8)^2).

J_s = 6 synoptic Rossby-like waves travel east, j = 1..J_s:

    theta_j = m_j (lam - Omega_j t) + p_j,   Omega_j = c_j / (R cos 45deg),
    M_j(phi) = cos(l_j (phi - q_j)),   P_j(t) = 0.6 + 0.4 cos(2 pi t / tau_j + s_j),
    m_j integer in [4, 12] (zonal wavelength 2400-7100 km at 45deg), l_j ~ U(4, 12) per rad,
    c_j ~ U(6, 14) m/s, tau_j ~ U(6, 20) days, V_j ~ U(3, 7) m/s, phases uniform.

They are the streamfunction psi = sum_j P_j (V_j R / m_j) cos(phi) cos(theta_j) M_j, whose
non-divergent wind u' = -(1/R) d psi/d phi, v' = (1/(R cos phi)) d psi/d lam is

    v' = -sum_j P_j V_j sin(theta_j) M_j,
    u' =  sum_j P_j (V_j / m_j) cos(theta_j) [sin(phi) M_j + l_j cos(phi) sin(l_j (phi - q_j))].

The large-scale flow is (u, v) = (U + u', v'). Each field is sum_j A_j(phi) B_j(t, lam), a matrix
product per time step.

10 m wind (u10, v10; m/s)
-------------------------
The large-scale flow slowed by the surface: more friction over land and over rough terrain
(s_h = std of orography in the 3x3 cell neighbourhood), plus small-scale turbulence:

    u10 = f u + 0.5 f n_u,  v10 = f v + 0.5 f n_v,  f = (1 - 0.3 lsm) / (1 + s_h / 300 m),

n_u, n_v independent per time step, unit-variance, same k^-3 small-scale spectrum as for T
below (wavelengths shorter than 8 cells).

2 m temperature (t2m; K)
------------------------
    T = T0(phi) + T_season + T_syn + T_diurnal - Gamma orog (1 - 0.6 S) - T_pool + 0.4 K n_T,
    T0(phi) = 299 K - 42 K sin^2(phi),
    T_season = -(3 K + 12 K c) sin(phi) cos(2 pi (d - 20) / 365.2425)
        (c = continentality, the mean of lsm over a box of +-200 km, at least +-1 cell: land
        interiors swing up to 5x more than sea; sin(phi)
        flips the sign between hemispheres, coldest ~20 January in the north),
    T_syn = -tanh(phi / 15deg) sum_j 0.7 K s/m * V_j P_j sin(theta_j) M_j
        (in phase with v': warm where the flow comes from the equator; vanishes in the
        tropics, a few K in mid-latitudes; wavelengths of thousands of km),
    Gamma = 6.5 K/km (lapse rate: fine-scale detail predictable from orog),
    S = tanh(T_syn / 3 K) (stability: warm advection is stable, so the lapse rate drops to
        ~2.6 K/km; cold advection steepens it to ~10.4 K/km: the fine-scale contrast on slopes
        depends on the weather, not only on the pixel),
    T_pool = 5 K min(d / 150 m, 1.5) [lsm > 0.5] exp(-|U| / 3 m/s) (1 - cloud) (valley cold
        pools under calm, clear skies; d = depth of the cell below the mean orography of a
        +-60 km box, U = (U + u', v') the large-scale flow, cloud as in the diurnal cycle; in
        hourly data times (1 - cos(2 pi (LST - 15) / 24)), nocturnal with the same daily mean),
    n_T: unit-variance noise with power spectrum k^-3 restricted to wavelengths shorter than
        8 cells, factor (1 - exp(-(k / (1/8))^4)), independent each time step (fine-scale
        detail that no static field predicts).

Diurnal cycle (hourly frequency only; it averages out of daily means), peak at 15 local solar
time LST = UTC hour + lam / 15deg:

    T_diurnal = A cos(2 pi (LST - 15) / 24),   A = (0.5 K + 4.5 K lsm) (1 - 0.5 cloud),
    cloud = clip(0.5 + 0.5 (z - z0), 0, 1)   (z, z0: rain potential below).

Daily minimum / maximum temperature (mn2t, mx2t; K)
---------------------------------------------------
Daily frequency: derived analytically. The daily mean of T_mean + A cos(.) is T_mean and its
extremes are T_mean -/+ A, so mn2t = t2m - A, mx2t = t2m + A (same noise as t2m).
Hourly frequency: ERA5's min/max over the preceding hour. Over one hour only the diurnal term
changes appreciably, Delta = T_diurnal(t) - T_diurnal(t - 1 h), so

    mx2t = t2m + max(0, -Delta) + 0.15 K,   mn2t = t2m - max(0, Delta) - 0.15 K

(0.15 K stands for sub-hourly fluctuations). Always mn2t <= t2m <= mx2t.

Total precipitation (tp; mm/day)
--------------------------------
Rain potential, roughly unit variance around a climatology:

    z = W(phi, d) + 0.6 tanh(phi / 15deg) v' / sd(v') + 0.8 r / sd(r),
    W = 1.2 exp(-((phi - phi_itcz) / 10)^2) - 0.7 exp(-((|phi| - 25) / 10)^2)
        + 0.3 exp(-((|phi| - 55) / 15)^2) - 0.3,   phi_itcz = 6 sin(2 pi (d - 110) / 365.2425),
    r = sum_i P_i cos(theta_i) M_i: J_r = 8 smaller moving rain systems, m_i in [8, 24],
        l_i ~ U(8, 24), c_i ~ U(8, 16) m/s, tau_i ~ U(3, 8) days; sd() are the analytic
        standard deviations of the random-phase sums (E P^2 / 4 = 0.11 per wave).

Rain falls where z exceeds z0 = 0.2 (rain ahead of warm-advection troughs, the ITCZ, dry
subtropics), is enhanced on windward slopes and gets multiplicative small-scale noise:

    tp = R0 max(0, z - z0) (1 + alpha min(w_max, max(0, u . grad orog)))
         exp(sigma_p n_p - sigma_p^2 / 2),
    R0 = 9 mm/day, alpha = 15 s/m, w_max = 0.2 m/s (caps the factor at 4),
    sigma_p = 0.4, n_p: unit-variance small-scale noise (as n_T),

u . grad orog the upslope velocity of the large-scale flow (u, v) in m/s. Values below
0.1 mm/day (trace) are set to 0. This gives roughly 35-70% dry cells (fewer in the tropics),
a mean of 2-5 mm/day, a 99.9th percentile of 35-60 mm/day and rare extremes of a few hundred
on steep windward slopes.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
import xarray as xr

from ..variables import BY_SHORT_NAME, VARIABLES

EARTH_RADIUS_M = 6.371e6
TIME_ORIGIN = np.datetime64("2000-01-01T00:00", "ns")  # t = 0 for every phase
FREQUENCIES = ("daily", "hourly")
SECONDS_PER_DAY = 86400.0
DAYS_PER_YEAR = 365.2425

# Terrain.
TERRAIN_BETA = 2.5
TERRAIN_OUTER_SCALE_KM = 2000.0
LAND_FRACTION_RANGE = (0.45, 0.65)
PEAK_HEIGHT_RANGE_M = (2000.0, 3000.0)
ROUGHNESS_SIGMA = 0.45
ROUGHNESS_MAX_WAVELENGTH_CELLS = 6.0
N_RIDGES = 2

# Flow and temperature.
N_SYNOPTIC_WAVES = 6
N_RAIN_WAVES = 8
WAVE_VARIANCE = 0.11  # E[P^2] / 4 for P = 0.6 + 0.4 cos(.) and random phases
FRICTION_LAND = 0.3
FRICTION_ROUGHNESS_M = 300.0
WIND_NOISE_MS = 0.5
LAPSE_RATE_K_PER_M = 6.5e-3
STABILITY_LAPSE_FRACTION = 0.6  # lapse rate 6.5 K/km x (1 -/+ 0.6) in stable / unstable air
STABILITY_SCALE_K = 3.0
COLD_POOL_K = 5.0
VALLEY_RADIUS_KM = 60.0
VALLEY_DEPTH_M = 150.0
CALM_WIND_MS = 3.0
T_NOISE_K = 0.4
NOISE_MAX_WAVELENGTH_CELLS = 8.0
SYNOPTIC_K_PER_MS = 0.7
CONTINENTALITY_KM = 200.0
DIURNAL_SEA_K, DIURNAL_LAND_K = 0.5, 4.5
SUBHOURLY_K = 0.15

# Precipitation.
RAIN_THRESHOLD = 0.2
RAIN_RATE_MM_DAY = 9.0
OROGRAPHIC_ALPHA_S_PER_M = 15.0
UPSLOPE_MAX_MS = 0.2
RAIN_NOISE_SIGMA = 0.4
TRACE_MM_DAY = 0.1

# Cells per time chunk: bounds the temporaries (about ten float32 arrays of this size, 4 MiB
# each) and keeps them small enough that the allocator reuses rather than maps fresh pages.
CHUNK_CELLS = 2**20

_STREAMS = ("terrain", "synoptic", "rain", "noise_t", "noise_tp", "noise_u", "noise_v")


def generate(
    variables: list[str],
    region: dict,
    resolution: float,
    start: str,
    end: str,
    frequency: str = "daily",
    seed: int = 0,
) -> tuple[xr.Dataset, xr.Dataset]:
    """Return (fields, static) on a regular lat-lon grid.

    `fields` has dims (time, lat, lon), float32, one variable per requested config name under
    its short name (units K, mm/day, m/s); time runs from `start` 00:00 to `end` inclusive,
    one stamp per day at 00:00 ("daily", daily means and extremes) or every hour through
    `end` 23:00 ("hourly"). `static` has `orog` (m) and `lsm` (0..1) on (lat, lon). The grid
    is cell-centred in `region` (south, north, west, east in degrees) with `resolution`
    degrees spacing. The same arguments always give bit-identical arrays, and each field does
    not depend on which other variables are requested. See the module docstring for physics.
    """
    shorts = _check_variables(variables)
    lat, lon = _grid(region, resolution)
    times = _times(start, end, frequency)
    first, last = _parse_date(start, "start"), _parse_date(end, "end")
    seed = _check_seed(seed)
    streams = dict(zip(_STREAMS, np.random.SeedSequence(seed).spawn(len(_STREAMS)), strict=True))
    rngs = {name: np.random.default_rng(s) for name, s in streams.items()}

    orog, lsm, terrain_attrs = _terrain(lat, lon, rngs["terrain"])
    atmosphere = _Atmosphere(lat, lon, orog, lsm, rngs)
    hourly = frequency == "hourly"
    # Seconds since TIME_ORIGIN at which each step is evaluated (daily: the middle of the day).
    t_eval = (times - TIME_ORIGIN) / np.timedelta64(1, "s")
    if not hourly:
        t_eval = t_eval + SECONDS_PER_DAY / 2

    ny, nx = lat.size, lon.size
    out = {s: np.empty((times.size, ny, nx), dtype=np.float32) for s in shorts}
    step = max(1, CHUNK_CELLS // (ny * nx))
    for i0 in range(0, times.size, step):
        window = slice(i0, i0 + step)
        atmosphere.evaluate(t_eval[window], {s: out[s][window] for s in shorts}, hourly)

    params = {
        "source": "synthetic",
        "variables": ",".join(variables),
        "region": json.dumps({k: float(region[k]) for k in ("south", "north", "west", "east")}),
        "resolution": float(resolution),
        "start": first.isoformat(),
        "end": last.isoformat(),
        "frequency": frequency,
        "seed": seed,
        "Conventions": "CF-1.8",
    }
    coords = _coords(lat, lon)
    fields = xr.Dataset(
        {s: (("time", "lat", "lon"), out[s], _var_attrs(s)) for s in shorts},
        coords={
            "time": ("time", times, {"standard_name": "time", "long_name": "time", "axis": "T"}),
            **coords,
        },
        attrs=params,
    )
    # xarray owns a datetime coordinate's `units` (it refuses them in attrs), so the CF units
    # go into the encoding and appear in every file written from this dataset.
    fields["time"].encoding.update(
        {"units": "hours since 2000-01-01 00:00:00", "calendar": "proleptic_gregorian"}
    )
    static = xr.Dataset(
        {
            "orog": (("lat", "lon"), orog, _var_attrs("orog")),
            "lsm": (("lat", "lon"), lsm, _var_attrs("lsm")),
        },
        coords=coords,
        attrs={**params, **terrain_attrs},
    )
    return fields, static


# --------------------------------------------------------------------------- validation


def _check_variables(variables: list[str]) -> list[str]:
    """Map config names to short names; unknown or repeated names fail naming the choices."""
    if isinstance(variables, str) or not isinstance(variables, list | tuple):
        raise ValueError(
            f"variables must be a list of config names, got {variables!r}; "
            f"valid choices: {sorted(VARIABLES)}"
        )
    if not variables:
        raise ValueError(f"variables is empty; choose from {sorted(VARIABLES)}")
    unknown = [v for v in variables if v not in VARIABLES]
    if unknown:
        raise ValueError(
            f"unknown variable(s) {unknown} in variables; valid choices: {sorted(VARIABLES)}"
        )
    if len(set(variables)) != len(variables):
        raise ValueError(f"variables lists a name twice: {list(variables)}; list each once")
    return [VARIABLES[v].short_name for v in variables]


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _grid(region: dict, resolution: float) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centred latitudes and longitudes (ascending, float64) of the region."""
    if isinstance(resolution, bool) or not isinstance(resolution, int | float | np.number):
        raise ValueError(f"resolution must be a positive number of degrees, got {resolution!r}")
    resolution = float(resolution)
    if not math.isfinite(resolution) or resolution <= 0:
        raise ValueError(f"resolution must be a positive number of degrees, got {resolution!r}")
    keys = ("south", "north", "west", "east")
    if not isinstance(region, dict) or any(k not in region for k in keys):
        raise ValueError(f"region must be a dict with keys {list(keys)} (degrees), got {region!r}")
    try:
        south, north, west, east = (float(region[k]) for k in keys)
    except (TypeError, ValueError):
        raise ValueError(f"region values must be numbers of degrees, got {region!r}") from None
    if not (-90 <= south < north <= 90):
        raise ValueError(
            f"region needs -90 <= south < north <= 90, got south={south}, north={north}"
        )
    if not (-180 <= west < east <= 180):
        raise ValueError(f"region needs -180 <= west < east <= 180, got west={west}, east={east}")
    counts = []
    for name, lo, hi in (("north - south", south, north), ("east - west", west, east)):
        n = (hi - lo) / resolution
        if abs(n - round(n)) > 1e-6 * max(1.0, n) or round(n) < 1:
            fix = round(n) * resolution if round(n) >= 1 else resolution
            raise ValueError(
                f"region extent {name} = {hi - lo} degrees is not a multiple of resolution "
                f"{resolution}; change the region (e.g. to an extent of {fix} degrees) or "
                f"choose a resolution that divides it"
            )
        counts.append(round(n))
    ny, nx = counts
    lat = south + resolution / 2 + np.arange(ny) * resolution
    lon = west + resolution / 2 + np.arange(nx) * resolution
    return lat, lon


def _parse_date(value: str, name: str) -> dt.date:
    if isinstance(value, dt.date):
        return value if not isinstance(value, dt.datetime) else value.date()
    try:
        return dt.datetime.fromisoformat(str(value)).date()
    except ValueError:
        raise ValueError(f"{name} must be an ISO date like '2000-01-31', got {value!r}") from None


def _times(start: str, end: str, frequency: str) -> np.ndarray:
    """Time stamps (datetime64[ns]) from start to end inclusive: 00:00 daily, or every hour."""
    if frequency not in FREQUENCIES:
        raise ValueError(f"frequency must be one of {list(FREQUENCIES)}, got {frequency!r}")
    first, last = _parse_date(start, "start"), _parse_date(end, "end")
    if last < first:
        raise ValueError(f"end ({last}) is before start ({first}); swap them or fix the dates")
    stop = np.datetime64(last + dt.timedelta(days=1), "D")
    unit = "D" if frequency == "daily" else "h"
    return np.arange(np.datetime64(first, unit), stop.astype(f"datetime64[{unit}]")).astype(
        "datetime64[ns]"
    )


def _coords(lat: np.ndarray, lon: np.ndarray) -> dict:
    return {
        "lat": (
            "lat",
            lat,
            {
                "units": "degrees_north",
                "standard_name": "latitude",
                "long_name": "latitude",
                "axis": "Y",
            },
        ),
        "lon": (
            "lon",
            lon,
            {
                "units": "degrees_east",
                "standard_name": "longitude",
                "long_name": "longitude",
                "axis": "X",
            },
        ),
    }


def _var_attrs(short: str) -> dict:
    """CF attributes of a variable, from the registry."""
    v = BY_SHORT_NAME[short]
    return {"units": v.units, "standard_name": v.standard_name, "long_name": v.long_name}


# --------------------------------------------------------------------------- spectral tools


def _box_mean(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean over the (2r+1)^2 neighbourhood, edges padded by reflection."""
    if radius <= 0:
        return a.astype(np.float64)
    p = np.pad(a.astype(np.float64), radius, mode="reflect" if min(a.shape) > radius else "edge")
    # Summed-area table: exact box sums in O(cells).
    s = np.zeros((p.shape[0] + 1, p.shape[1] + 1))
    s[1:, 1:] = p.cumsum(0).cumsum(1)
    w = 2 * radius + 1
    ny, nx = a.shape
    box = s[w : w + ny, w : w + nx] - s[:ny, w : w + nx] - s[w : w + ny, :nx] + s[:ny, :nx]
    return box / (w * w)


def _small_scale_filter(ny: int, nx: int, max_wavelength_cells: float) -> np.ndarray:
    """rfft2 amplitudes of a unit-variance field with power k^-3 at wavelengths < the cutoff."""
    ky = scipy.fft.fftfreq(ny)[:, None]
    kx = scipy.fft.rfftfreq(nx)[None, :]
    k = np.hypot(kx, ky)
    kc = 1.0 / max_wavelength_cells
    safe = np.where(k > 0, k, 1.0)  # the mean (k = 0) carries no noise
    amp = np.where(k > 0, safe**-1.5 * (1 - np.exp(-((safe / kc) ** 4))), 0.0)
    return _normalise_rfft_amplitude(amp, ny, nx)


def _normalise_rfft_amplitude(amp: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """Scale amplitudes so irfft2(amp * (N + iN)) has unit expected variance.

    Each rfft column other than 0 and Nyquist stands for two conjugate columns of the full
    spectrum, and each complex coefficient carries variance 2 amp^2.
    """
    weights = np.full(amp.shape[1], 2.0)
    weights[0] = 1.0
    if nx % 2 == 0 and amp.shape[1] > 1:
        weights[-1] = 1.0
    var = 2.0 * float((weights * amp**2).sum()) / (ny * nx) ** 2
    if var == 0:  # a grid too small to hold any small-scale wave: the noise is zero
        return amp
    return amp / math.sqrt(var)


def _gaussian_field(
    rng: np.random.Generator,
    amp: np.ndarray,
    shape: tuple,
    ny: int,
    nx: int,
    white: np.ndarray | None = None,
) -> np.ndarray:
    """Random fields of the given rfft2 amplitude; `shape` prefixes the (ny, nx) dims.

    `white`, if given, is a float32 buffer of shape (*shape, *amp.shape, 2) to draw into, so
    that repeated calls do not allocate (and page-fault) a fresh spectrum each time.
    """
    if white is None:
        white = np.empty((*shape, *amp.shape, 2), dtype=np.float32)
    rng.standard_normal(dtype=np.float32, out=white)
    spec = white.view(np.complex64)[..., 0]
    spec *= amp.astype(np.float32)
    return scipy.fft.irfft2(spec, s=(ny, nx), axes=(-2, -1), overwrite_x=True)


# --------------------------------------------------------------------------- terrain


def _terrain(
    lat: np.ndarray, lon: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fractal terrain with ridges, sea level set by a land fraction; returns orog, lsm, attrs."""
    ny, nx = lat.size, lon.size
    r_km = EARTH_RADIUS_M / 1000
    dlat = np.deg2rad(lat[1] - lat[0]) if ny > 1 else np.deg2rad(1.0)
    dlon = np.deg2rad(lon[1] - lon[0]) if nx > 1 else dlat
    dy_km = r_km * dlat
    dx_km = r_km * dlon * max(0.2, math.cos(np.deg2rad(lat.mean())))

    # Fractal base: power (k^2 + k0^2)^(-beta/2) in physical wavenumbers.
    k = np.hypot(scipy.fft.fftfreq(ny, dy_km)[:, None], scipy.fft.rfftfreq(nx, dx_km)[None, :])
    amp = (k**2 + (1 / TERRAIN_OUTER_SCALE_KM) ** 2) ** (-TERRAIN_BETA / 4)
    amp[0, 0] = 0.0
    white = rng.standard_normal((*amp.shape, 2))
    base = scipy.fft.irfft2(amp * (white[..., 0] + 1j * white[..., 1]), s=(ny, nx))
    base = (base - base.mean()) / (base.std() or 1.0)

    # Ridges: Gaussian in the distance to a random segment (km, local flat frame).
    y = (np.arange(ny) * dy_km)[:, None]
    x = (np.arange(nx) * dx_km)[None, :]
    ly, lx = ny * dy_km, nx * dx_km
    ridges = np.zeros((ny, nx))
    for _ in range(N_RIDGES):
        cy, cx = rng.uniform(0.2, 0.8) * ly, rng.uniform(0.2, 0.8) * lx
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(0.2, 0.4) * math.hypot(lx, ly)
        width = max(rng.uniform(0.03, 0.06) * min(lx, ly), 1.5 * max(dx_km, dy_km))
        height = rng.uniform(1.5, 2.5)
        ex, ey = math.cos(angle), math.sin(angle)
        along = np.clip((x - cx) * ex + (y - cy) * ey, -half, half)
        dist = np.hypot(x - cx - along * ex, y - cy - along * ey)
        ridges += height * np.exp(-((dist / width) ** 2))
    relief = base + ridges

    land_fraction = rng.uniform(*LAND_FRACTION_RANGE)
    threshold = np.quantile(relief, 1 - land_fraction)
    land = relief > threshold
    h0 = np.maximum(relief - threshold, 0.0)

    # Multiplicative roughness: sub-grid (4x4 block) variance, larger on high ground.
    rough = _gaussian_field(
        rng, _small_scale_filter(ny, nx, ROUGHNESS_MAX_WAVELENGTH_CELLS), (), ny, nx
    ).astype(np.float64)
    h = h0 * np.exp(ROUGHNESS_SIGMA * rough - ROUGHNESS_SIGMA**2 / 2)
    peak = rng.uniform(*PEAK_HEIGHT_RANGE_M)
    if h.max() > 0:
        h *= peak / h.max()
    orog = np.where(land, h, 0.0).astype(np.float32)

    # Mask smooth over about one cell: tanh over the typical neighbour-to-neighbour change.
    steps = np.concatenate([np.abs(np.diff(relief, axis=a)).ravel() for a in (0, 1)])
    width = float(np.median(steps)) if steps.size else 1.0
    lsm = (0.5 * (1 + np.tanh((relief - threshold) / (width or 1.0)))).astype(np.float32)
    attrs = {"land_fraction_target": float(land_fraction), "peak_height_m": float(peak)}
    return orog, lsm, attrs


# --------------------------------------------------------------------------- atmosphere


@dataclass(frozen=True)
class _Waves:
    """A set of travelling waves P_j(t) cos(m_j (lam - Omega_j t) + p_j) cos(l_j (phi - q_j))."""

    m: np.ndarray
    l: np.ndarray  # noqa: E741 - the meridional wavenumber's usual name
    q: np.ndarray
    p: np.ndarray
    omega: np.ndarray  # rad/s
    tau: np.ndarray  # s
    s: np.ndarray
    amp: np.ndarray

    @classmethod
    def draw(
        cls,
        rng: np.random.Generator,
        n: int,
        m_range: tuple[int, int],
        l_range: tuple[float, float],
        c_range: tuple[float, float],
        tau_days: tuple[float, float],
        amp_range: tuple[float, float],
    ) -> _Waves:
        m = rng.integers(m_range[0], m_range[1] + 1, n).astype(np.float64)
        speed = rng.uniform(*c_range, n)
        return cls(
            m=m,
            l=rng.uniform(*l_range, n),
            q=rng.uniform(-np.pi / 2, np.pi / 2, n),
            p=rng.uniform(0, 2 * np.pi, n),
            omega=speed / (EARTH_RADIUS_M * math.cos(math.radians(45))),
            tau=rng.uniform(*tau_days, n) * SECONDS_PER_DAY,
            s=rng.uniform(0, 2 * np.pi, n),
            amp=rng.uniform(*amp_range, n),
        )

    def zonal(self, t: np.ndarray, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P_j(t) cos(theta_j) and P_j(t) sin(theta_j), each (time, wave, lon), float32."""
        envelope = 0.6 + 0.4 * np.cos(2 * np.pi * t[:, None] / self.tau + self.s)
        theta = self.m[None, :, None] * (lam[None, None, :] - (self.omega * t[:, None])[..., None])
        theta += self.p[None, :, None]
        env = envelope[..., None]
        return (env * np.cos(theta)).astype(np.float32), (env * np.sin(theta)).astype(np.float32)

    def meridional(self, phi: np.ndarray) -> np.ndarray:
        """M_j(phi), (wave, lat)."""
        return np.cos(self.l[:, None] * (phi[None, :] - self.q[:, None]))


class _Atmosphere:
    """Weather generator on a fixed grid: precomputed static parts, fields per time chunk."""

    def __init__(
        self,
        lat: np.ndarray,
        lon: np.ndarray,
        orog: np.ndarray,
        lsm: np.ndarray,
        rngs: dict[str, np.random.Generator],
    ) -> None:
        self.ny, self.nx = lat.size, lon.size
        self.lat_deg = lat
        phi, lam = np.deg2rad(lat), np.deg2rad(lon)
        self.lam = lam
        self.rngs = rngs
        col = (slice(None), None)  # (lat,) -> (lat, 1)

        self.syn = _Waves.draw(
            rngs["synoptic"],
            N_SYNOPTIC_WAVES,
            (4, 12),
            (4.0, 12.0),
            (6.0, 14.0),
            (6.0, 20.0),
            (3.0, 7.0),
        )
        self.rain = _Waves.draw(
            rngs["rain"], N_RAIN_WAVES, (8, 24), (8.0, 24.0), (8.0, 16.0), (3.0, 8.0), (1.0, 1.0)
        )
        syn_m = self.syn.meridional(phi)
        syn_d = np.sin(phi)[None, :] * syn_m + self.syn.l[:, None] * np.cos(phi)[None, :] * np.sin(
            self.syn.l[:, None] * (phi[None, :] - self.syn.q[:, None])
        )
        # Latitude matrices (lat, wave) for field = A @ B(t) with B (wave, lon).
        self.v_lat = (-(self.syn.amp[:, None] * syn_m)).T.astype(np.float32)
        self.u_lat = ((self.syn.amp / self.syn.m)[:, None] * syn_d).T.astype(np.float32)
        self.v_sd = math.sqrt(WAVE_VARIANCE * float((self.syn.amp**2).sum()))
        self.rain_lat = self.rain.meridional(phi).T.astype(np.float32)
        self.rain_sd = math.sqrt(WAVE_VARIANCE * N_RAIN_WAVES)
        self.hemisphere = np.tanh(lat / 15.0)[col].astype(np.float32)

        self.u_mean = (
            -5 * np.exp(-(((np.abs(lat) - 15) / 12) ** 2))
            + 8 * np.exp(-(((np.abs(lat) - 48) / 12) ** 2))
            - 3 * np.exp(-(((np.abs(lat) - 75) / 8) ** 2))
        )[col].astype(np.float32)
        self.sinphi = np.sin(phi)[col]

        # Statics entering the weather.
        self.orog = orog
        self.lsm = lsm
        rough = np.sqrt(
            np.maximum(_box_mean(orog.astype(np.float64) ** 2, 1) - _box_mean(orog, 1) ** 2, 0.0)
        )
        self.friction = ((1 - FRICTION_LAND * lsm) / (1 + rough / FRICTION_ROUGHNESS_M)).astype(
            np.float32
        )
        cell_km = EARTH_RADIUS_M / 1000 * (np.deg2rad(lat[1] - lat[0]) if self.ny > 1 else 1.0)
        radius = max(1, round(CONTINENTALITY_KM / cell_km))
        self.continental = _box_mean(lsm, min(radius, max(lsm.shape))).astype(np.float32)
        self.t0 = (299.0 - 42.0 * np.sin(phi) ** 2)[col].astype(np.float32)
        self.diurnal_amp = (DIURNAL_SEA_K + DIURNAL_LAND_K * lsm).astype(np.float32)
        self.lapse = (LAPSE_RATE_K_PER_M * orog).astype(np.float32)
        # Valley depth below the surrounding terrain (a +-60 km box): where cold air pools.
        valley_radius = max(1, round(VALLEY_RADIUS_KM / cell_km))
        depth = np.maximum(_box_mean(orog, min(valley_radius, max(orog.shape))) - orog, 0.0)
        self.cold_pool = (COLD_POOL_K * np.minimum(depth / VALLEY_DEPTH_M, 1.5)
                          * (lsm > 0.5)).astype(np.float32)
        # Orography gradient (m/m) on the sphere for the upslope wind.
        dlat = np.deg2rad(lat[1] - lat[0]) if self.ny > 1 else 1.0
        dlon = np.deg2rad(lon[1] - lon[0]) if self.nx > 1 else 1.0
        o = orog.astype(np.float64)
        dh_dy = np.gradient(o, axis=0) / (EARTH_RADIUS_M * dlat) if self.ny > 1 else 0 * o
        coslat = np.maximum(np.cos(phi), 0.05)[col]
        dh_dx = np.gradient(o, axis=1) / (EARTH_RADIUS_M * dlon * coslat) if self.nx > 1 else 0 * o
        self.dh_dx = dh_dx.astype(np.float32)
        self.dh_dy = dh_dy.astype(np.float32)
        self.noise_amp = _small_scale_filter(self.ny, self.nx, NOISE_MAX_WAVELENGTH_CELLS)
        self._buffers: dict[str, np.ndarray] = {}
        # Time-independent parts of T and z, precomputed once.
        self.t_static = (self.t0 - self.lapse).astype(np.float32)
        self.amp_season = ((3.0 + 12.0 * self.continental) * self.sinphi).astype(np.float32)
        self.t_vcoef = (SYNOPTIC_K_PER_MS * self.hemisphere).astype(np.float32)
        self.z_vcoef = ((0.6 / self.v_sd) * self.hemisphere).astype(np.float32)
        self.clim_static = (
            -0.7 * np.exp(-(((np.abs(lat) - 25) / 10) ** 2))
            + 0.3 * np.exp(-(((np.abs(lat) - 55) / 15) ** 2))
            - 0.3
        )[None, :]

    def _buffer(self, name: str, n: int) -> np.ndarray:
        """A reusable float32 (n, lat, lon) work array: allocating fresh multi-MiB arrays every
        chunk makes the allocator map and fault new pages, which costs more than the maths."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < n:
            buf = self._buffers[name] = np.empty((n, self.ny, self.nx), dtype=np.float32)
        return buf[:n]

    def _noise(self, stream: str, n: int) -> np.ndarray:
        white = self._buffers.get("white")
        if white is None or white.shape[0] < n:
            white = self._buffers["white"] = np.empty(
                (n, *self.noise_amp.shape, 2), dtype=np.float32
            )
        return _gaussian_field(
            self.rngs[stream], self.noise_amp, (n,), self.ny, self.nx, white=white[:n]
        )

    def _combine(self, lat_part: np.ndarray, lon_part: np.ndarray, out: np.ndarray) -> np.ndarray:
        """sum_j A[lat, j] B[t, j, lon] -> (t, lat, lon); one small GEMM per step is the fastest."""
        for i in range(lon_part.shape[0]):
            np.matmul(lat_part, lon_part[i], out=out[i])
        return out

    def evaluate(self, t: np.ndarray, out: dict[str, np.ndarray], hourly: bool) -> None:
        """Write every field in `out` (short name -> (time, lat, lon) float32 view) at times t.

        t is in seconds since TIME_ORIGIN. Work is done in place, in reused buffers, because at
        these sizes allocating and touching fresh arrays costs more than the arithmetic.
        """
        n = t.size
        want = set(out)
        need_t = bool(want & {"t2m", "mn2t", "mx2t"})
        cos_s, sin_s = self.syn.zonal(t, self.lam)
        v_syn = self._combine(self.v_lat, sin_s, self._buffer("v", n))
        work = self._buffer("work", n)
        z = None
        if "tp" in want or need_t:
            cos_r, _ = self.rain.zonal(t, self.lam)
            days = t / SECONDS_PER_DAY
            itcz = 6.0 * np.sin(2 * np.pi * (days - 110) / DAYS_PER_YEAR)
            clim = 1.2 * np.exp(-(((self.lat_deg[None, :] - itcz[:, None]) / 10) ** 2))
            clim += self.clim_static
            z = self._combine(self.rain_lat, cos_r, self._buffer("z", n))
            z *= 0.8 / self.rain_sd
            z += clim.astype(np.float32)[..., None]
            z += np.multiply(self.z_vcoef, v_syn, out=work)
        calm = None
        if want & {"u10", "v10", "tp"} or need_t:
            u = self._combine(self.u_lat, cos_s, self._buffer("u", n))
            u += self.u_mean
            if need_t:  # calm = exp(-|U| / 3 m/s) of the large-scale flow, before u is reused
                calm = np.hypot(u, v_syn, out=self._buffer("calm", n))
                calm *= -1.0 / CALM_WIND_MS
                np.exp(calm, out=calm)
            for name, flow in (("u10", u), ("v10", v_syn)):
                if name in want:
                    turbulence = self._noise(f"noise_{name[0]}", n)
                    turbulence *= WIND_NOISE_MS
                    turbulence += flow
                    np.multiply(turbulence, self.friction, out=out[name])
            if "tp" in want:
                self._precipitation(z, u, v_syn, out["tp"])
        if need_t:
            self._temperature(t, v_syn, z, calm, out, hourly)

    def _precipitation(self, z: np.ndarray, u: np.ndarray, v: np.ndarray, rate: np.ndarray) -> None:
        """tp into `rate`: thresholded rain potential x windward factor x lognormal noise."""
        upslope = np.multiply(u, self.dh_dx, out=u)  # u is not needed after this
        upslope += np.multiply(v, self.dh_dy, out=self._buffer("work", z.shape[0]))
        np.clip(upslope, 0.0, UPSLOPE_MAX_MS, out=upslope)
        upslope *= RAIN_RATE_MM_DAY * OROGRAPHIC_ALPHA_S_PER_M
        upslope += RAIN_RATE_MM_DAY
        np.subtract(z, RAIN_THRESHOLD, out=rate)
        np.maximum(rate, 0.0, out=rate)
        rate *= upslope
        noise = self._noise("noise_tp", z.shape[0])
        noise *= RAIN_NOISE_SIGMA
        noise -= RAIN_NOISE_SIGMA**2 / 2
        np.exp(noise, out=noise)
        rate *= noise
        rate[rate < TRACE_MM_DAY] = 0.0

    def _temperature(
        self,
        t: np.ndarray,
        v_syn: np.ndarray,
        z: np.ndarray,
        calm: np.ndarray,
        out: dict[str, np.ndarray],
        hourly: bool,
    ) -> None:
        """t2m, mn2t, mx2t into their views in `out` (whichever are there)."""
        n = t.size
        temp = out["t2m"] if "t2m" in out else self._buffer("t", n)
        days = (t / SECONDS_PER_DAY)[:, None, None]
        season = np.cos(2 * np.pi * (days - 20) / DAYS_PER_YEAR).astype(np.float32)
        np.multiply(self.amp_season, season, out=temp)
        np.subtract(self.t_static, temp, out=temp)
        v_syn *= self.t_vcoef  # v_syn is not needed after this: reuse it for T_syn
        temp += v_syn
        # Stability: warm advection (T_syn > 0) is stable, the lapse rate shrinks; cold air
        # is unstable, it steepens. Gamma_eff orog = Gamma orog (1 - 0.6 tanh(T_syn / 3 K)).
        stable = np.multiply(v_syn, 1.0 / STABILITY_SCALE_K, out=v_syn)
        np.tanh(stable, out=stable)
        temp += np.multiply(stable, STABILITY_LAPSE_FRACTION * self.lapse, out=stable)
        noise = self._noise("noise_t", t.size)
        noise *= T_NOISE_K
        temp += noise
        # Diurnal amplitude A = A_0 (1 - 0.5 cloud), cloud = clip(0.5 + 0.5 (z - z0), 0, 1).
        amp = np.subtract(z, RAIN_THRESHOLD - 1.0, out=self._buffer("work", n))
        np.clip(amp, 0.0, 2.0, out=amp)
        # Valley cold pools under clear (cloud 0) and calm skies: -C_p d calm (1 - cloud).
        pool = np.multiply(amp, -0.5, out=self._buffer("pool", n))
        pool += 1.0
        pool *= calm
        pool *= self.cold_pool
        if hourly:  # nocturnal: strongest before dawn, gone in the afternoon (daily mean kept)
            lst = (t / 3600.0)[:, None] + np.rad2deg(self.lam)[None, :] / 15.0
            pool *= (1.0 - np.cos(2 * np.pi * (lst - 15) / 24)).astype(np.float32)[:, None, :]
        temp -= pool
        amp *= -0.25
        amp += 1.0
        amp *= self.diurnal_amp
        if not hourly:
            # Daily mean: the diurnal cosine averages out; its extremes are -/+ amp.
            if "mn2t" in out:
                np.subtract(temp, amp, out=out["mn2t"])
            if "mx2t" in out:
                np.add(temp, amp, out=out["mx2t"])
            return
        hours = (t / 3600.0)[:, None] + np.rad2deg(self.lam)[None, :] / 15.0  # local solar time
        now = np.cos(2 * np.pi * (hours - 15) / 24).astype(np.float32)[:, None, :]
        before = np.cos(2 * np.pi * (hours - 16) / 24).astype(np.float32)[:, None, :]
        diurnal = np.multiply(amp, now, out=z)  # z is not needed any more
        temp += diurnal
        if "mn2t" in out or "mx2t" in out:
            delta = np.multiply(amp, before, out=amp)
            np.subtract(diurnal, delta, out=delta)  # change over the past hour
            if "mx2t" in out:
                high = out["mx2t"]
                np.negative(delta, out=high)
                np.maximum(high, 0.0, out=high)
                high += SUBHOURLY_K
                high += temp
            if "mn2t" in out:
                low = out["mn2t"]
                np.maximum(delta, 0.0, out=low)
                low += SUBHOURLY_K
                np.subtract(temp, low, out=low)
