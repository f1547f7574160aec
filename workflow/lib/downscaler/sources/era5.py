"""ERA5 from the Climate Data Store: request planning and conversion to the canonical form.

Planning splits the period by month and variable group so every request stays under the
service's field ceiling and never mixes step types (which makes the CDS answer a zip).
Loading turns the new-CDS netCDF layout (valid_time, latitude 90 -> -90, longitude 0..360,
number/expver coords, tp in metres per hour) into the canonical `fields` (time, lat, lon) and
`static` (orog, lsm) datasets, with the coordinate helpers of `canonical`.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from downscaler.sources.canonical import canonical_coords, finalise
from downscaler.sources.cds import Request, download_settings, expected_times, request_area
from downscaler.variables import STATICS, VARIABLES

LOG = logging.getLogger(__name__)

SINGLE_LEVELS = "reanalysis-era5-single-levels"
PRESSURE_LEVELS = "reanalysis-era5-pressure-levels"
STATIC_TARGET = Path("era5") / "static_z-lsm.nc"
G0 = 9.80665  # m s-2, the WMO standard gravity ECMWF uses to define geopotential height
HOURS = [f"{h:02d}:00" for h in range(24)]

# ERA5 long name -> (name inside CDS netCDF files, GRIB stepType). Variables of different
# stepTypes in one request make the CDS answer a zip, so requests group by stepType.
ERA5_SINGLE: dict[str, tuple[str, str]] = {
    "2m_temperature": ("t2m", "instant"),
    "10m_u_component_of_wind": ("u10", "instant"),
    "10m_v_component_of_wind": ("v10", "instant"),
    "total_precipitation": ("tp", "accum"),
    "minimum_2m_temperature_since_previous_post_processing": ("mn2t", "min"),
    "maximum_2m_temperature_since_previous_post_processing": ("mx2t", "max"),
    "geopotential": ("z", "instant"),
    "land_sea_mask": ("lsm", "instant"),
}
ERA5_PRESSURE: dict[str, str] = {
    "temperature": "t",
    "u_component_of_wind": "u",
    "v_component_of_wind": "v",
    "specific_humidity": "q",
    "relative_humidity": "r",
    "geopotential": "z",
    "vertical_velocity": "w",
}
# Daily statistic per canonical short name; processed (non-instant) variables describe the hour
# ending at their valid time, so they are shifted back one hour before grouping by day.
DAILY_STAT = {"t2m": "mean", "u10": "mean", "v10": "mean", "tp": "sum", "mn2t": "min",
              "mx2t": "max"}
PROCESSED = {"tp", "mn2t", "mx2t"}


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


def _chunks(names: list[str], days: list[pd.Timestamp], n_times: int, n_levels: int,
            max_fields: int, what: str) -> list[tuple[list[str], list[pd.Timestamp]]]:
    """Split (variables x days) so that variables x days x times x levels <= max_fields."""
    per_var_day = n_times * n_levels
    per_var = len(days) * per_var_day
    if per_var <= max_fields:
        k = max(1, max_fields // per_var)
        return [(names[i:i + k], days) for i in range(0, len(names), k)]
    dk = max_fields // per_var_day
    if dk < 1:
        raise ValueError(
            f"era5.max_fields_per_request={max_fields} is below one day of one {what} variable "
            f"({per_var_day} fields = {n_times} times x {n_levels} levels): raise it "
            f"(the CDS accepts about 6000-9000) or request fewer pressure_levels."
        )
    return [([n], days[j:j + dk]) for n in names for j in range(0, len(days), dk)]


def _make_request(dataset: str, names: list[str], days: list[pd.Timestamp], times: list[str],
                  config: dict, levels: list[int] | None, tag: str) -> Request:
    grid = float(config["era5"]["grid"])  # the source's resolution (sources.prepare sets it)
    req: dict[str, Any] = {
        "product_type": ["reanalysis"],
        "variable": list(names),
        "year": [f"{days[0].year:04d}"],
        "month": [f"{days[0].month:02d}"],
        "day": [f"{d.day:02d}" for d in days],
        "time": list(times),
        "data_format": download_settings(config).data_format,
        "download_format": "unarchived",
        "grid": [grid, grid],
    }
    if levels:
        req["pressure_level"] = [str(lv) for lv in levels]
    area = request_area(config.get("region"))
    if area is not None:
        req["area"] = area
    if levels:
        shorts = [ERA5_PRESSURE[n] for n in names]
    else:
        shorts = [ERA5_SINGLE[n][0] for n in names]
    month = f"{days[0].year:04d}-{days[0].month:02d}"
    # the day span is part of the name whenever a request covers less than its whole month
    full = len(days) == days[0].days_in_month and len(times) == 24
    span = "" if full else f"_d{days[0].day:02d}-{days[-1].day:02d}"
    if len(times) == 1 and not full:
        span += f"T{times[0][:2]}"
    lv = f"_{'-'.join(str(x) for x in levels)}hPa" if levels else ""
    target = Path("era5") / tag / f"{month}{span}_{'-'.join(shorts)}{lv}.nc"
    label = f"{' '.join(names)} {month}{span.replace('_', ' ')}{lv.replace('_', ' ')}"
    return Request(
        dataset=dataset,
        request=req,
        target=target,
        variables=tuple(shorts),
        times=expected_times(req),
        label=label,
        fields=len(names) * len(days) * len(times) * (len(levels) if levels else 1),
    )


def plan_era5_requests(config: dict, invariants: bool = True) -> list[Request]:
    """Plan the CDS requests for config: split by month, step-type group and field limit.

    Single-level variables are grouped by stepType (instant / accum / min / max) so no answer
    is a zip; each group x month is split further to stay under era5.max_fields_per_request
    (fields = variables x time steps x levels). For daily output, processed variables (tp,
    mn2t, mx2t: the hour ending at the valid time) also get 00:00 of the day after the period,
    so the last day has all 24 hours. With `invariants`, the LAST request is the invariants
    (geopotential, land_sea_mask at one time) landing at STATIC_TARGET.
    """
    e5 = config["era5"]
    settings = download_settings(config)
    fmt = settings.data_format
    if fmt != "netcdf":
        raise ValueError(f"era5.data_format={fmt!r}: only 'netcdf' is supported (GRIB would "
                         "need cfgrib/eccodes); set era5.data_format: netcdf")
    names = list(config.get("variables") or [])
    unknown = [n for n in names if n not in ERA5_SINGLE or n not in VARIABLES]
    if unknown:
        raise ValueError(f"variables {unknown} are not ERA5 single-level variables known to the "
                         f"workflow; choose from {sorted(VARIABLES)}")
    pl_names = list(e5.get("pressure_level_variables") or [])
    levels = [int(x) for x in (e5.get("pressure_levels") or [])]
    bad = [n for n in pl_names if n not in ERA5_PRESSURE]
    if bad:
        raise ValueError(f"era5.pressure_level_variables {bad} unknown; choose from "
                         f"{sorted(ERA5_PRESSURE)}")
    if pl_names and not levels:
        raise ValueError("era5.pressure_level_variables is set but era5.pressure_levels is "
                         "empty: list the levels in hPa, e.g. [850, 500]")
    max_fields = int(settings.max_fields_per_request)
    period = config["period"]
    start, end = pd.Timestamp(period["start"]), pd.Timestamp(period["end"])
    if end < start:
        raise ValueError(f"period.end {period['end']} is before period.start {period['start']}")
    days = list(pd.date_range(start, end, freq="D"))
    by_month: dict[tuple[int, int], list[pd.Timestamp]] = {}
    for d in days:
        by_month.setdefault((d.year, d.month), []).append(d)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(ERA5_SINGLE[n][1], []).append(n)
    daily = config["frequency"] == "daily"

    out: list[Request] = []
    for month_days in by_month.values():
        for step in ("instant", "accum", "min", "max"):
            if step not in groups:
                continue
            for chunk, cdays in _chunks(groups[step], month_days, 24, 1, max_fields, "single"):
                out.append(_make_request(SINGLE_LEVELS, chunk, cdays, HOURS, config, None,
                                         "single-levels"))
        if pl_names:
            for chunk, cdays in _chunks(pl_names, month_days, 24, len(levels), max_fields,
                                        "pressure-level"):
                out.append(_make_request(PRESSURE_LEVELS, chunk, cdays, HOURS, config, levels,
                                         "pressure-levels"))
    if daily:
        after = [end + pd.Timedelta(days=1)]
        for step in ("accum", "min", "max"):
            if step in groups:
                out.append(_make_request(SINGLE_LEVELS, groups[step], after, ["00:00"], config,
                                         None, "single-levels"))
    if not invariants:
        return out
    static = _make_request(SINGLE_LEVELS, ["geopotential", "land_sea_mask"], [start], ["00:00"],
                           config, None, "single-levels")
    out.append(Request(dataset=static.dataset, request=static.request, target=STATIC_TARGET,
                       variables=static.variables, times=static.times,
                       label="invariants geopotential land_sea_mask", fields=static.fields))
    return out


# ---------------------------------------------------------------------------------------------
# Reading and canonical conversion (source-agnostic helpers first)
# ---------------------------------------------------------------------------------------------

def open_answer(path: Path) -> list[xr.Dataset]:
    """Open a CDS answer: a netCDF file, or a zip with one netCDF member per stepType."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        out = []
        with zipfile.ZipFile(path) as zf:
            members = sorted(m for m in zf.namelist() if m.endswith(".nc"))
            if not members:
                raise ValueError(f"{path}: zip answer has no netCDF member ({zf.namelist()})")
            for m in members:
                with zf.open(m) as fh:
                    out.append(xr.open_dataset(fh.read(), decode_timedelta=False).load())
        return out
    try:
        return [xr.open_dataset(path, decode_timedelta=False)]
    except Exception as exc:
        raise ValueError(
            f"{path}: cannot open as netCDF ({exc}); delete it and fetch again"
        ) from exc


def standardize_coords(ds: xr.Dataset) -> xr.Dataset:
    """Canonical coordinates (`canonical.canonical_coords`) without auxiliary coordinates."""
    ds = canonical_coords(ds)
    return ds.drop_vars([c for c in ds.coords if c not in ds.dims and c != "time"])


def split_levels(ds: xr.Dataset) -> xr.Dataset:
    """Turn (time, level, lat, lon) variables into one (time, lat, lon) variable per level."""
    if "level" not in ds.dims:
        return ds.drop_vars("level", errors="ignore")
    out = {}
    for name, da in ds.data_vars.items():
        if "level" in da.dims:
            for lv in da["level"].values:
                v = da.sel(level=lv).drop_vars("level")
                v.attrs = {**da.attrs, "level_hPa": float(lv)}
                out[f"{name}{int(lv)}"] = v
        else:
            out[name] = da
    return xr.Dataset(out, attrs=ds.attrs)


def _concat_by_variables(parts: Iterable[xr.Dataset]) -> xr.Dataset:
    """Concatenate along time the files holding the same variables, then merge the groups."""
    groups: dict[tuple[str, ...], list[xr.Dataset]] = {}
    for ds in parts:
        groups.setdefault(tuple(sorted(map(str, ds.data_vars))), []).append(ds)
    merged = []
    for dss in groups.values():
        dss = sorted(dss, key=lambda d: d["time"].values.min())
        cat = xr.concat(dss, dim="time", data_vars="all", join="outer") if len(dss) > 1 \
            else dss[0]
        cat = cat.sel(time=~cat.get_index("time").duplicated())
        merged.append(cat)
    return xr.merge(merged, join="outer", compat="no_conflicts", combine_attrs="drop")


def _complete_days(times: pd.DatetimeIndex, steps: int) -> pd.DatetimeIndex:
    counts = pd.Series(1, index=times).resample("1D").sum()
    return counts.index[counts.values >= steps]


def daily_aggregate(
    hourly: xr.Dataset, days: pd.DatetimeIndex, stat: str | None = None
) -> xr.Dataset:
    """Daily values from hourly ERA5: mean (t2m, u10, v10, level vars), 24-h sum of tp in mm,
    min of mn2t, max of mx2t. Processed variables (tp, mn2t, mx2t) are valid for the hour
    ending at their time stamp, so day D uses D 01:00 .. D+1 00:00. A day with fewer than 24
    hourly steps is NaN (and warned about) rather than a biased value. `stat` overrides the
    statistic for every variable (used for mn2t/mx2t from t2m).
    """
    out = {}
    one_hour = np.timedelta64(1, "h")
    for name, da in hourly.data_vars.items():
        how = stat or DAILY_STAT.get(str(name), "mean")
        if name in PROCESSED:
            da = da.assign_coords(time=da["time"].values - one_hour)
        da = da.dropna("time", how="all")
        res = da.resample(time="1D")
        agg = getattr(res, how)()
        full = _complete_days(da.get_index("time"), 24)
        agg = agg.reindex(time=days)
        incomplete = days.difference(full)
        if len(incomplete):
            warnings.warn(
                f"{name}: {len(incomplete)} day(s) lack some of their 24 hourly steps (first "
                f"{incomplete[0].date()}); they are NaN. Fetch the missing hours and reload.",
                stacklevel=2,
            )
            agg = agg.where(xr.DataArray(days.isin(full), coords={"time": days}, dims="time"))
        out[name] = agg
    return xr.Dataset(out)


def load_era5(paths: list[Path], static_path: Path | None,
              config: dict) -> tuple[xr.Dataset, xr.Dataset | None]:
    """Read downloaded ERA5 answers into canonical (fields, static) datasets.

    fields: (time, lat, lon), lat ascending, lon in [-180, 180), float32, registry short names
    and units (t2m K, tp mm/day, u10/v10 m/s, mn2t/mx2t K; pressure-level variables as e.g.
    t850), daily when config frequency is daily. static: orog = z / g0 in m (values below sea
    level are kept: they are real, e.g. the Dead Sea) and lsm in 0..1, on (lat, lon).
    If mn2t/mx2t are asked for but absent from the files, they fall back to the min/max of
    hourly t2m (with a warning: hourly sampling slightly narrows the true range).
    """
    period = config["period"]
    start = pd.Timestamp(period["start"])
    end = pd.Timestamp(period["end"])
    daily = config["frequency"] == "daily"
    parts = []
    for p in paths:
        for ds in open_answer(Path(p)):
            ds = split_levels(standardize_coords(ds))
            if "time" not in ds.dims:
                raise ValueError(f"{p}: no time dimension (valid_time/time); not an ERA5 answer")
            tp_units = ds["tp"].attrs.get("units", "m") if "tp" in ds else "m"
            if tp_units not in ("m", "m of water equivalent"):
                raise ValueError(f"{p}: tp has units {ds['tp'].attrs['units']!r}; ERA5 total "
                                 "precipitation is expected in metres")
            parts.append(ds)
    if not parts:
        raise ValueError("load_era5 got no files: run the download first")
    hourly = _concat_by_variables(parts)

    wanted = [VARIABLES[n].short_name for n in config.get("variables") or []]
    e5 = config.get("era5") or {}
    for n in e5.get("pressure_level_variables") or []:
        wanted += [f"{ERA5_PRESSURE[n]}{int(lv)}" for lv in e5.get("pressure_levels") or []]
    fallback: dict[str, str] = {}
    for ext, stat in (("mn2t", "min"), ("mx2t", "max")):
        if ext in wanted and ext not in hourly and "t2m" in hourly:
            warnings.warn(f"{ext} is not in the ERA5 files: using the {stat} of hourly t2m "
                          "(slightly narrower than the true extreme)", stacklevel=2)
            fallback[ext] = stat
    missing = [w for w in wanted if w not in hourly and w not in fallback]
    if missing:
        raise ValueError(f"ERA5 files {[str(p) for p in paths][:3]} lack variable(s) "
                         f"{missing}; re-run the download for them")
    direct = [w for w in wanted if w not in fallback] if wanted else list(hourly.data_vars)
    hourly = hourly[direct]
    if "tp" in hourly:
        hourly["tp"] = hourly["tp"].clip(min=0.0)  # GRIB packing leaves tiny negative values

    if daily:
        days = pd.date_range(start, end, freq="D")
        fields = daily_aggregate(hourly, days)
        for ext, stat in fallback.items():
            fields[ext] = daily_aggregate(hourly[["t2m"]], days, stat=stat)["t2m"]
        if "tp" in fields:
            fields["tp"] = fields["tp"] * 1000.0  # 24-h sum in m -> mm per day
    else:
        fields = hourly.sel(time=slice(start, end + pd.Timedelta(hours=23)))
        for ext in fallback:
            fields[ext] = fields["t2m"]
        if "tp" in fields:
            fields["tp"] = fields["tp"] * 1000.0 * 24.0  # m per hour -> mm/day as a rate
    if wanted:
        fields = fields[wanted]
    fields = finalise(fields.transpose("time", "lat", "lon"))
    fields.attrs = {
        "source": "ERA5 reanalysis, Copernicus Climate Change Service Climate Data Store",
        "frequency": "day" if daily else "1hr",
        "Conventions": "CF-1.8",
    }
    return fields, (load_static(static_path) if static_path is not None else None)


def load_static(static_path: Path) -> xr.Dataset:
    """orog (m) from geopotential z / g0 and lsm (0..1) on (lat, lon) from the invariants file."""
    parts = [standardize_coords(d) for d in open_answer(Path(static_path))]
    ds = xr.merge(parts, compat="override", combine_attrs="drop")
    missing = [v for v in ("z", "lsm") if v not in ds]
    if missing:
        raise ValueError(f"{static_path}: invariants file lacks {missing}; delete it and fetch "
                         "again (geopotential, land_sea_mask)")
    if "time" in ds.dims:
        ds = ds.isel(time=0)
    ds = ds.drop_vars("time", errors="ignore")
    orog = (ds["z"] / G0).transpose("lat", "lon")
    lsm = ds["lsm"].clip(0.0, 1.0).transpose("lat", "lon")
    static = xr.Dataset({STATICS["orography"].short_name: orog,
                         STATICS["land_sea_mask"].short_name: lsm})
    static = finalise(static)
    static.attrs = {"source": "ERA5 invariants (geopotential, land_sea_mask), CDS",
                    "Conventions": "CF-1.8"}
    return static
