"""Turn a dataset of any usual provenance (ERA5 netCDF/GRIB, CMIP6, hand-made) into canonical form.

Canonical form is what every source writes, so later stages never know where data came from:
dims (time, [level,] lat, lon); lat ascending; lon in -180..180 ascending (a global grid is rolled,
never cropped); `time` as datetime64 on the proleptic Gregorian calendar; registry short names and
units (K, mm/day, m/s); float32; CF attributes on variables and coordinates. Static fields
(orography in m, land-sea mask as a 0..1 fraction) live on (lat, lon) and are split off by
`split_statics`.

Naming choice for geopotential: `z` WITHOUT a level dimension is surface geopotential, which
becomes orography `orog` (m, divided by g = 9.80665). `z` ON pressure levels (e.g. ERA-Interim
u/v/z) is an atmospheric field, not orography: it keeps its name `z` and its units m2 s-2.
Variables outside the registry (u, v, z on levels, ...) keep their names; only their unit strings
are normalised (m s**-1 -> m/s).
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import xarray as xr

from downscaler.variables import BY_SHORT_NAME, STATICS, short_names

log = logging.getLogger(__name__)

G0 = 9.80665  # standard gravity (m s-2): geopotential -> geometric height, as ECMWF does

# Coordinate aliases seen in ERA5 (old/new CDS, cfgrib), CMIP6, NEMO and hand-made files.
TIME_ALIASES = ("valid_time", "date", "time_counter", "Time", "times")
LAT_ALIASES = ("latitude", "nav_lat", "lats", "Latitude", "LAT", "XLAT")
LON_ALIASES = ("longitude", "nav_lon", "lons", "Longitude", "LON", "XLONG")
LEVEL_ALIASES = ("pressure_level", "plev", "isobaricInhPa", "level", "pressure", "pres")

# Scalar/bookkeeping coordinates that carry no information once data are canonical: ensemble
# member, ERA5/ERA5T flag, GRIB step and level-type markers, CMIP6's 2 m / 10 m `height`.
DROP_COORDS = (
    "number", "expver", "step", "surface", "heightAboveGround", "height", "meanSea",
    "depthBelowLandLayer", "entireAtmosphere", "realization", "member_id",
)

# File variable name -> registry short name (ERA5 netCDF, ERA5 GRIB shortName, CMIP6 names).
NAME_MAP: dict[str, str] = {
    "t2m": "t2m", "2t": "t2m", "tas": "t2m",
    "tp": "tp", "pr": "tp",
    "u10": "u10", "10u": "u10", "uas": "u10",
    "v10": "v10", "10v": "v10", "vas": "v10",
    "mn2t": "mn2t", "tasmin": "mn2t",
    "mx2t": "mx2t", "tasmax": "mx2t",
    "orog": "orog", "lsm": "lsm", "sftlf": "lsm",
}
STATIC_SHORT = {v.short_name for v in STATICS.values()}
DERIVED_STATICS = {"latitude"}  # computed from the grid later, never read from a file

# Unit conversions: normalised unit string -> (scale, offset) so that canonical = x*scale + offset.
_TEMPERATURE = {
    "k": (1.0, 0.0), "kelvin": (1.0, 0.0), "degk": (1.0, 0.0), "deg_k": (1.0, 0.0),
    "degc": (1.0, 273.15), "deg_c": (1.0, 273.15), "c": (1.0, 273.15), "°c": (1.0, 273.15),
    "celsius": (1.0, 273.15), "degrees_celsius": (1.0, 273.15), "degree_celsius": (1.0, 273.15),
    "degf": (5.0 / 9.0, 273.15 - 32.0 * 5.0 / 9.0), "°f": (5.0 / 9.0, 273.15 - 32.0 * 5.0 / 9.0),
}
_PRECIP = {
    # ERA5 `tp` in "m" is the accumulation over the previous hour (reanalysis-era5-*):
    # m/h * 1000 mm/m * 24 h/day. Subsampled hourly data (e.g. 6-hourly) are still 1 h totals.
    "m": (24_000.0, 0.0),
    "mm/day": (1.0, 0.0), "mm day-1": (1.0, 0.0), "mm/d": (1.0, 0.0), "mm d-1": (1.0, 0.0),
    "kg m-2 day-1": (1.0, 0.0), "kg m-2 d-1": (1.0, 0.0),
    "kg m-2 s-1": (86_400.0, 0.0), "kg/m2/s": (86_400.0, 0.0), "mm/s": (86_400.0, 0.0),
    "mm s-1": (86_400.0, 0.0), "m/s": (86_400_000.0, 0.0), "m s-1": (86_400_000.0, 0.0),
    "mm/h": (24.0, 0.0), "mm h-1": (24.0, 0.0), "mm hr-1": (24.0, 0.0), "mm/hr": (24.0, 0.0),
    "m/day": (1000.0, 0.0), "m day-1": (1000.0, 0.0), "m d-1": (1000.0, 0.0),
}
_WIND = {
    "m/s": (1.0, 0.0), "m s-1": (1.0, 0.0), "m.s-1": (1.0, 0.0), "meters/second": (1.0, 0.0),
    "km/h": (1.0 / 3.6, 0.0), "km h-1": (1.0 / 3.6, 0.0),
    "knots": (0.514444, 0.0), "kt": (0.514444, 0.0), "kn": (0.514444, 0.0),
}
_OROG = {
    "m": (1.0, 0.0), "meters": (1.0, 0.0), "metres": (1.0, 0.0), "km": (1000.0, 0.0),
    "m2 s-2": (1.0 / G0, 0.0), "m2/s2": (1.0 / G0, 0.0),  # geopotential -> height
}
_FRACTION = {
    "1": (1.0, 0.0), "": (1.0, 0.0), "0-1": (1.0, 0.0), "(0 - 1)": (1.0, 0.0),
    "fraction": (1.0, 0.0), "%": (0.01, 0.0), "percent": (0.01, 0.0),
}
CONVERSIONS: dict[str, dict[str, tuple[float, float]]] = {
    "t2m": _TEMPERATURE, "mn2t": _TEMPERATURE, "mx2t": _TEMPERATURE,
    "tp": _PRECIP, "u10": _WIND, "v10": _WIND, "orog": _OROG, "lsm": _FRACTION,
}
# Spellings of units kept on non-registry variables, tidied to one form.
_TIDY_UNITS = {"m s-1": "m/s", "m.s-1": "m/s", "m2 s-2": "m2 s-2", "kg kg-1": "kg/kg"}


def normalise_units(units: str | None) -> str:
    """Fold the many spellings of a unit string (`m s**-1`, `m s^-1`, `kg m-2 s-1`) to one."""
    if units is None:
        return ""
    u = str(units).strip().lower()
    u = u.replace("**", "").replace("^", "")
    u = re.sub(r"\s+", " ", u)
    return u


def canonicalize(ds: xr.Dataset, variables: list[str] | None = None) -> xr.Dataset:
    """Return `ds` in canonical form; `variables` (config long names) selects and checks them.

    Renames coordinates, drops bookkeeping coordinates, maps ERA5/CMIP6 names onto registry
    short names, converts units from each variable's `units` attribute, sorts lat ascending,
    wraps lon to -180..180 and converts non-standard calendars (see `to_standard_calendar`).
    """
    source = _describe(ds)
    ds = ds.copy()
    ds = _drop_bounds(ds)
    ds = _rename_coords(ds, source)
    ds = _fix_time(ds, source)
    ds = _drop_bookkeeping(ds, source)
    ds = _fix_level(ds)
    ds = _rename_variables(ds, source)
    ds = _convert_units(ds, source)
    if variables is not None:
        ds = _select(ds, variables, source)
    ds = _fix_lat_lon(ds, source)
    ds = finalise(ds)
    return ds


def canonical_coords(ds: xr.Dataset) -> xr.Dataset:
    """Only the coordinate steps of `canonicalize`: names (time, level, lat, lon), valid times,
    bookkeeping coordinates dropped (ERA5/ERA5T rows merged), levels in hPa, lat ascending, lon
    in -180..180. Variables keep their names and units (used on raw ERA5 answers, whose
    accumulations are aggregated before their units are converted)."""
    source = _describe(ds)
    ds = _drop_bounds(ds.copy())
    ds = _rename_coords(ds, source)
    ds = _fix_time(ds, source)
    ds = _drop_bookkeeping(ds, source)
    ds = _fix_level(ds)
    return _fix_lat_lon(ds, source)


def split_statics(ds: xr.Dataset) -> tuple[xr.Dataset, xr.Dataset]:
    """Split a canonical dataset into (fields, static).

    Static = every data variable without a time dimension, plus the registry statics (orog,
    lsm) even when given with time steps (ERA5 serves time-invariant z/lsm with one time step
    per request): those are time-invariant by definition, so the first step is kept.
    """
    static_names, field_names = [], []
    for name, da in ds.data_vars.items():
        if "time" not in da.dims or name in STATIC_SHORT:
            static_names.append(name)
        else:
            field_names.append(name)
    static_vars = {}
    for name in static_names:
        da = ds[name]
        if "time" in da.dims:
            da = da.isel(time=0)
        static_vars[name] = da.drop_vars("time", errors="ignore")
    static = xr.Dataset(static_vars, attrs=dict(ds.attrs))
    fields = ds[field_names] if field_names else ds.drop_vars(static_names)
    return fields, static


def to_standard_calendar(ds: xr.Dataset, source: str = "dataset") -> xr.Dataset:
    """Convert a cftime `time` axis (noleap, 360_day, all_leap, julian, ...) to datetime64.

    Dates are matched by calendar date, never interpolated, so no value is invented:
    - noleap/365_day: Feb 29 does not exist in the model, so leap years simply lack it (gap).
    - all_leap/366_day and julian: Feb 29 of non-leap Gregorian years is dropped.
    - 360_day (`align_on="date"`): Feb 29 (non-leap years) and Feb 30 are dropped; day 31 of
      Jan/Mar/May/Jul/Aug/Oct/Dec is absent (a gap).
    Gaps are kept as gaps: later stages split by date and never assume a regular step.
    """
    if "time" not in ds.coords or ds["time"].dtype.kind == "M":
        return ds
    values = ds["time"].values
    if values.dtype != object or not hasattr(values.flat[0], "calendar"):
        raise ValueError(
            f"{source}: could not decode the time axis (dtype {values.dtype}); give `time` CF "
            "units such as 'days since 2000-01-01' and a `calendar` attribute"
        )
    calendar = values.flat[0].calendar
    kwargs = {"align_on": "date"} if calendar == "360_day" else {}
    if "time" not in ds.dims:  # a single, scalar time stamp
        ds = ds.expand_dims("time")
    out = ds.convert_calendar("proleptic_gregorian", dim="time", use_cftime=False, **kwargs)
    dropped = ds.sizes["time"] - out.sizes["time"]
    if dropped:
        log.info("%s: %d time step(s) of calendar %s have no Gregorian date; dropped",
                 source, dropped, calendar)
    return out


# --- steps of canonicalize -----------------------------------------------------------------


def _describe(ds: xr.Dataset) -> str:
    """A name for error messages: the file xarray read it from, when known."""
    src = ds.encoding.get("source")
    return f"file {src}" if src else "dataset"


def _drop_bounds(ds: xr.Dataset) -> xr.Dataset:
    """Drop cell-bound variables (time_bnds, lat_bnds, ...): canonical grids are cell centres."""
    names = {ds[c].attrs.get("bounds") for c in ds.variables} - {None}
    names |= {n for n in ds.variables if re.search(r"_(bnds|bounds)$", str(n))}
    return ds.drop_vars([n for n in names if n in ds.variables])


def _rename_coords(ds: xr.Dataset, source: str) -> xr.Dataset:
    """Rename lat/lon/level aliases. Time is handled by `_fix_time` (cfgrib needs care)."""
    mapping: dict[str, str] = {}
    for target, aliases in (("lat", LAT_ALIASES), ("lon", LON_ALIASES)):
        if target in ds.variables:
            continue
        for alias in aliases:
            if alias in ds.variables:
                if ds[alias].ndim > 1:
                    raise ValueError(
                        f"{source}: {alias!r} is {ds[alias].ndim}-D (a curvilinear grid); "
                        "regrid it to a regular lat/lon grid (e.g. with xESMF or cdo "
                        "remapcon) before using it as a source"
                    )
                mapping[alias] = target
                break
    if "level" not in ds.variables:
        for alias in LEVEL_ALIASES:
            # only coordinates: `pres` or `pressure` may also be a (surface) data variable
            if alias in ds.coords and ds[alias].ndim <= 1:
                mapping[alias] = "level"
                break
    ds = ds.rename(mapping)
    # A 1-D lat/lon that is not yet an index (e.g. renamed non-dim coord): make it the dim.
    for name in ("lat", "lon", "level"):
        if name in ds.variables and name not in ds.dims and ds[name].ndim == 1:
            ds = ds.swap_dims({ds[name].dims[0]: name})
    for name in ("lat", "lon"):
        if name not in ds.dims:
            raise ValueError(
                f"{source}: no {name} coordinate found (looked for {name!r} and "
                f"{list(LAT_ALIASES if name == 'lat' else LON_ALIASES)}); its variables are "
                f"{sorted(map(str, ds.variables))}"
            )
    return ds


def _fix_time(ds: xr.Dataset, source: str) -> xr.Dataset:
    """Make one `time` dimension of valid times, whatever the layout it came in.

    Layouts: new-CDS netCDF (`valid_time` dim); old netCDF (`time`); cfgrib analyses (`time`
    dim plus a `valid_time` coord on it); cfgrib forecasts/accumulations (`time` x `step` with a
    2-D `valid_time`): stacked to one axis of valid times; `date` as YYYYMMDD integers.
    """
    if "valid_time" in ds.variables:
        vt = ds["valid_time"]
        if vt.ndim == 2 and "step" in vt.dims:
            other = next(d for d in vt.dims if d != "step")
            stacked = ds.stack(_vt=(other, "step"))
            valid = stacked["valid_time"].values
            stacked = stacked.drop_vars(["_vt", other, "step", "valid_time"])
            ds = stacked.assign_coords(_vt=valid).rename({"_vt": "time"})
            # forecast steps outside the requested hours are all-NaN rows: drop them
            ds = ds.dropna("time", how="all").sortby("time")
        elif vt.ndim <= 1 and "time" in ds.variables and "valid_time" not in ds.dims:
            # cfgrib: `time` is the forecast reference time; the valid time is what we want
            values, dims = vt.values, vt.dims
            ds = ds.drop_vars("valid_time")
            if not dims:
                ds = ds.drop_vars("time").assign_coords(time=values)
            elif dims[0] == "time":
                ds = ds.assign_coords(time=("time", values))
            else:  # one reference time, several steps: the steps become the time axis
                ds = ds.drop_vars("time").assign_coords(time=(dims[0], values))
                ds = ds.swap_dims({dims[0]: "time"})
        elif "time" not in ds.variables:
            ds = ds.rename({"valid_time": "time"})
        else:
            ds = ds.drop_vars("valid_time")
    if "time" not in ds.variables:
        for alias in TIME_ALIASES:
            if alias in ds.variables:
                ds = ds.rename({alias: "time"})
                break
    if "time" not in ds.variables:
        return ds  # a purely static file (orography, land-sea mask)
    t = ds["time"]
    if t.dtype.kind in "iu" and t.size and int(t.values.flat[0]) > 10_000_000:
        # `date` as YYYYMMDD integers (CDS daily statistics, some hand-made files)
        parsed = pd.to_datetime(t.values.ravel().astype(str), format="%Y%m%d")
        ds = ds.assign_coords(time=(t.dims, parsed.values.reshape(t.shape)))
    if ds["time"].dtype.kind != "M":
        ds = to_standard_calendar(ds, source)
    if "time" not in ds.dims:
        ds = ds.expand_dims("time")
    return ds


def _drop_bookkeeping(ds: xr.Dataset, source: str) -> xr.Dataset:
    """Drop number/expver/step/level-type coords; merge ERA5 and ERA5T rows first."""
    if "expver" in ds.dims:
        # Old CDS netCDF: expver dim (1 = ERA5, 5 = ERA5T) with NaN where a row does not apply.
        merged = ds.isel(expver=0, drop=True)
        for i in range(1, ds.sizes["expver"]):
            merged = merged.fillna(ds.isel(expver=i, drop=True))
        ds = merged
    for name in DROP_COORDS:
        if name in ds.dims:
            if ds.sizes[name] > 1:
                raise ValueError(
                    f"{source}: dimension {name!r} has {ds.sizes[name]} entries (an ensemble "
                    f"or several forecast steps); select one, e.g. ds.isel({name}=0), first"
                )
            ds = ds.isel({name: 0}, drop=True)
    return ds.drop_vars([n for n in DROP_COORDS if n in ds.variables])


def _fix_level(ds: xr.Dataset) -> xr.Dataset:
    """Express pressure levels in hPa (CMIP6 `plev` is in Pa)."""
    if "level" not in ds.variables:
        return ds
    lev = ds["level"]
    units = normalise_units(lev.attrs.get("units"))
    values = lev.values.astype("float64")
    if units == "pa" or (not units and values.size and np.nanmax(values) > 2000):
        values = values / 100.0
    if values.size and np.all(values == np.round(values)):
        values = values.astype("int64")
    attrs = {"units": "hPa", "standard_name": "air_pressure", "long_name": "pressure level",
             "positive": "down", "axis": "Z"}
    return ds.assign_coords(level=(lev.dims, values, attrs))


def _rename_variables(ds: xr.Dataset, source: str) -> xr.Dataset:
    """Map ERA5 / CMIP6 names onto registry short names; surface `z` becomes orography."""
    mapping: dict[str, str] = {}
    for name, da in ds.data_vars.items():
        target = NAME_MAP.get(str(name))
        if name == "z" and "level" not in da.coords:
            target = "orog"  # surface geopotential: converted to metres by its units
        if target is not None and target != name:
            mapping[str(name)] = target
    targets = list(mapping.values())
    clash = {t for t in targets if targets.count(t) > 1 or (t in ds.data_vars)}
    if clash:
        sources = {k: v for k, v in mapping.items() if v in clash}
        raise ValueError(
            f"{source}: several variables map onto {sorted(clash)} ({sources}); keep one"
        )
    return ds.rename(mapping)


def _convert_units(ds: xr.Dataset, source: str) -> xr.Dataset:
    """Convert registry variables to registry units from their `units` attribute."""
    for name in list(ds.data_vars):
        da = ds[name]
        table = CONVERSIONS.get(str(name))
        units_attr = da.attrs.get("units")
        if table is None:
            if units_attr is not None:
                tidy = normalise_units(units_attr)
                da.attrs["units"] = _TIDY_UNITS.get(tidy, str(units_attr))
            continue
        target = BY_SHORT_NAME[str(name)].units
        if units_attr is None:
            log.warning("%s: %s has no units attribute; assuming %s", source, name, target)
            continue
        key = normalise_units(units_attr)
        if key not in table and key == normalise_units(target):
            continue
        if key not in table:
            hint = ""
            if name == "tp" and key in ("mm", "kg m-2"):
                hint = (" (an accumulation without its period is ambiguous: set units to "
                        "'mm/day', 'mm/h' or 'm' for ERA5 hourly totals)")
            raise ValueError(
                f"{source}: variable {name!r} has units {units_attr!r}, which cannot be "
                f"converted to {target}{hint}; known units: {sorted(table)}"
            )
        scale, offset = table[key]
        if scale != 1.0 or offset != 0.0:
            attrs = dict(da.attrs)
            da = da.astype("float64") * scale + offset
            da.attrs = attrs
        ds[name] = da
    return ds


def _select(ds: xr.Dataset, variables: list[str], source: str) -> xr.Dataset:
    """Keep the requested variables (plus statics present); a missing one is an error."""
    wanted = [s for s in short_names(list(variables)) if s not in DERIVED_STATICS]
    missing = [s for s in wanted if s not in ds.data_vars]
    if missing:
        raise KeyError(
            f"{source}: variable(s) {missing} (requested as {list(variables)}) not found; "
            f"it has {sorted(map(str, ds.data_vars))} (after mapping names onto "
            f"{sorted(NAME_MAP)} -> registry short names). Download them or fix `variables`."
        )
    keep = wanted + [s for s in STATIC_SHORT if s in ds.data_vars and s not in wanted]
    return ds[keep]


def _fix_lat_lon(ds: xr.Dataset, source: str) -> xr.Dataset:
    """Sort lat ascending; wrap lon into -180..180 and roll it ascending (nothing cropped)."""
    lat = ds["lat"].values.astype("float64")
    if lat.size > 1 and lat[0] > lat[-1]:
        ds = ds.isel(lat=slice(None, None, -1))
    elif lat.size > 2 and not np.all(np.diff(lat) > 0):
        ds = ds.sortby("lat")
    lon = ds["lon"].values.astype("float64")
    wrapped = ((lon + 180.0) % 360.0) - 180.0
    # Keep +180 (not -180) when it is the eastern edge of a regional grid west of it.
    wrapped = np.where((lon == 180.0) & (lon.min() >= 0) & (lon.max() <= 180.0), 180.0, wrapped)
    ds = ds.assign_coords(lon=("lon", wrapped))
    _, first = np.unique(wrapped, return_index=True)
    if first.size < wrapped.size:
        # 0..360 with both ends: the periodic duplicate column carries no information
        ds = ds.isel(lon=np.sort(first))
    if not np.all(np.diff(ds["lon"].values) > 0):
        ds = ds.sortby("lon")
    return ds


def finalise(ds: xr.Dataset) -> xr.Dataset:
    """float32, canonical dim order, CF attributes, and no stale on-disk encodings."""
    for name in list(ds.data_vars):
        da = ds[name]
        if da.dtype != np.float32:
            attrs = dict(da.attrs)
            ds[name] = da.astype("float32")
            ds[name].attrs = attrs
        spec = BY_SHORT_NAME.get(str(name))
        if spec is not None and spec.short_name not in DERIVED_STATICS:
            ds[name].attrs.update(
                units=spec.units,
                standard_name=spec.standard_name,
                long_name=spec.long_name.replace("_", " "),
            )
            for stale in ("GRIB_units", "GRIB_name", "GRIB_shortName", "GRIB_cfName",
                          "GRIB_cfVarName", "scale_factor", "add_offset"):
                ds[name].attrs.pop(stale, None)
    ds = ds.transpose("time", "level", ..., "lat", "lon", missing_dims="ignore")
    ds = ds.assign_coords(
        lat=("lat", ds["lat"].values.astype("float64"),
             {"units": "degrees_north", "standard_name": "latitude", "long_name": "latitude",
              "axis": "Y"}),
        lon=("lon", ds["lon"].values.astype("float64"),
             {"units": "degrees_east", "standard_name": "longitude", "long_name": "longitude",
              "axis": "X"}),
    )
    if "time" in ds.variables:
        # one resolution for every source (pandas 3 would otherwise mix us and ns)
        ds = ds.assign_coords(time=(ds["time"].dims, ds["time"].values.astype("datetime64[ns]"),
                                    {"standard_name": "time", "long_name": "time", "axis": "T"}))
    for var in ds.variables.values():
        # Packing (scale_factor, int16) and source calendars no longer apply after conversion.
        var.encoding = {}
    ds.encoding = {k: v for k, v in ds.encoding.items() if k == "source"}
    return ds


def check_plausible(ds: xr.Dataset, origin: str) -> None:
    """Values outside each variable's plausible range (e.g. Celsius labelled K) stop the run."""
    for name in ds.data_vars:
        meta = BY_SHORT_NAME.get(str(name))
        if meta is None or meta.valid_range is None:
            continue
        lo, hi = meta.valid_range
        da = ds[name]
        bad = (da < lo) | (da > hi)
        count = int(bad.sum())
        if count:
            example = float(da.where(bad).max() if bool((da > hi).any())
                            else da.where(bad).min())
            raise ValueError(
                f"{origin}: variable {name} has {count} value(s) outside the plausible range "
                f"{lo:g}..{hi:g} {meta.units} (e.g. {example:g}); check the file's units "
                f"attribute (e.g. Celsius labelled K) and its contents"
            )
