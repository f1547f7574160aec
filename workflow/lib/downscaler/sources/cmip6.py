"""The `cmip6` source: find CMIP6 files (ESGF DRS layout, locally or through intake-esgf) and
read them into the canonical form the model was trained on (ERA5 names and units).

Names: tas->t2m, pr->tp, uas->u10, vas->v10, tasmin->mn2t, tasmax->mx2t, orog->orog,
sftlf->lsm (percent -> fraction). Units: pr kg m-2 s-1 -> mm/day (x 86400).

Calendars (noleap/365_day, all_leap/366_day, 360_day, julian) become proleptic Gregorian by
matching calendar DATES, never by interpolation (see `canonical.to_standard_calendar`):
- noleap: Gregorian Feb 29 is missing from the output (a gap; nothing is invented);
- 360_day (`align_on="date"`): model Feb 29 (non-leap years) and Feb 30 are dropped, and day 31
  of Jan/Mar/May/Jul/Aug/Oct/Dec is missing (a gap).
Missing days are left missing, not filled by a neighbouring day, so every value in the output
is a value the model produced for that date.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import xarray as xr

from downscaler.io import atomic_path
from downscaler.sources.canonical import canonicalize
from downscaler.sources.cds import CDSError, Request, _default_factory, fetch, request_area
from downscaler.sources.local import _combine, _open_canonical
from downscaler.variables import STATICS, VARIABLES

log = logging.getLogger(__name__)

# registry short name -> CMIP6 variable_id
CMIP6_NAMES: dict[str, str] = {
    "t2m": "tas", "tp": "pr", "u10": "uas", "v10": "vas", "mn2t": "tasmin", "mx2t": "tasmax",
    "orog": "orog", "lsm": "sftlf",
}
FX_VARIABLES = {"orog", "sftlf"}  # time-invariant: published in table `fx`, not `day`/`Amon`
GRID_PREFERENCE = ("gn", "gr", "gr1", "gr2")  # native grid first: no extra interpolation
INSTALL_HINT = (
    "pip install 'intake-esgf>=2024.1,<2025.12' (2025.12 and later need Python 3.12; "
    "2025.10.22 works on Python 3.11)"
)


def cmip6_name(variable: str) -> str:
    """CMIP6 variable_id for a config long name, registry short name or CMIP6 name."""
    table = {**VARIABLES, **STATICS}
    if variable in table:
        variable = table[variable].short_name
    if variable in CMIP6_NAMES:
        return CMIP6_NAMES[variable]
    if variable in CMIP6_NAMES.values():
        return variable
    raise KeyError(
        f"no CMIP6 equivalent for variable {variable!r}; known: "
        f"{sorted(set(CMIP6_NAMES) | set(CMIP6_NAMES.values()))} or their config long names"
    )


def _long_name(variable: str) -> str:
    """Config long name for a long, short or CMIP6 name (what `canonicalize` selects by)."""
    short = {v: k for k, v in CMIP6_NAMES.items()}.get(variable, variable)
    for long, spec in {**VARIABLES, **STATICS}.items():
        if variable == long or short == spec.short_name:
            return long
    raise KeyError(f"unknown variable {variable!r}; valid: {sorted({**VARIABLES, **STATICS})}")


def esgf_path(
    root: str | os.PathLike,
    activity: str,
    institution: str,
    source_id: str,
    experiment: str,
    member: str,
    table: str,
    variable: str,
    grid: str,
    version: str,
    *,
    time_range: str | None = None,
) -> Path:
    """The ESGF DRS directory of one dataset; with `time_range` ("YYYYMMDD-YYYYMMDD"), a file.

    <root>/CMIP6/<activity>/<institution>/<source_id>/<experiment>/<member>/<table>/<variable>/
    <grid>/<version>/<variable>_<table>_<source_id>_<experiment>_<member>_<grid>_<range>.nc
    This is also how intake-esgf lays out its local cache, so one root serves both.
    """
    version = version if version.startswith("v") or version == "*" else f"v{version}"
    directory = (Path(root) / "CMIP6" / activity / institution / source_id / experiment
                 / member / table / variable / grid / version)
    if time_range is None:
        return directory
    name = f"{variable}_{table}_{source_id}_{experiment}_{member}_{grid}_{time_range}.nc"
    return directory / name


def find_local_cmip6(
    root: str | os.PathLike,
    source_id: str,
    experiment: str,
    member: str,
    table: str,
    variables: Iterable[str],
) -> dict[str, list[Path]]:
    """Find each variable's files under an ESGF DRS tree; keys are CMIP6 variable names.

    Picks the latest version and the native grid (gn) when several exist. Static variables
    (orog, sftlf) are looked up in table `fx`, falling back to any experiment/member of the
    same model, since groups publish them once.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"CMIP6 root {root} is not a directory; check the config path")
    found: dict[str, list[Path]] = {}
    for variable in variables:
        name = cmip6_name(variable)
        attempts = [(table, experiment, member)]
        if name in FX_VARIABLES:
            attempts = [("fx", experiment, member), ("fx", "*", "*")]
        files: list[Path] = []
        patterns = []
        for tab, exp, mem in attempts:
            pattern = esgf_path(root, "*", "*", source_id, exp, mem, tab, name, "*", "*",
                                time_range="*")
            if name in FX_VARIABLES:  # fx files have no time range in their name
                pattern = pattern.with_name(f"{name}_{tab}_{source_id}_{exp}_{mem}_*.nc")
            patterns.append(str(pattern))
            files = sorted(Path(p) for p in _glob(pattern))
            if files:
                break
        if not files:
            raise FileNotFoundError(
                f"no CMIP6 file for {name} ({source_id} {experiment} {member} {table}) under "
                f"{root}; looked for {patterns}. Fetch it with search_esgf(...) or point the "
                "config at the right root"
            )
        found[name] = _latest_dataset(files)
    return found


def search_esgf(
    source_id: str,
    experiment: str,
    member: str,
    table: str,
    variables: Iterable[str],
    search: Any | None = None,
    *,
    cache: str | os.PathLike | None = None,
    period: dict | None = None,
) -> dict[str, list[Path]]:
    """Find (and download into the local cache) CMIP6 files through intake-esgf's catalog.

    `search` is an intake-esgf `ESGFCatalog` (or an object with its `search(...)` and
    `to_path_dict(...)` methods); by default a fresh catalog is made. `cache` is the root it
    downloads into (DRS layout, so `find_local_cmip6(cache, ...)` finds the same files later).
    `period` ({"start", "end"}) skips files entirely outside it. Keys are CMIP6 variable names.
    """
    try:
        import intake_esgf
        from intake_esgf.exceptions import NoSearchResults
    except ImportError as err:
        raise ImportError(f"searching ESGF needs intake-esgf: {INSTALL_HINT}") from err
    names = [cmip6_name(v) for v in variables]
    timed = [n for n in names if n not in FX_VARIABLES]
    fixed = [n for n in names if n in FX_VARIABLES]
    conf = (intake_esgf.conf.set(local_cache=[str(Path(cache).expanduser())])
            if cache is not None else contextlib.nullcontext())
    out: dict[str, list[Path]] = {}
    with conf:
        for group, tab in ((timed, table), (fixed, "fx")):
            if not group:
                continue
            facets: dict[str, Any] = dict(
                project="CMIP6", source_id=source_id, experiment_id=experiment,
                member_id=member, table_id=tab, variable_id=group,
            )
            if period and tab != "fx":
                facets.update(file_start=period.get("start"), file_end=period.get("end"))
            catalog = search if search is not None else intake_esgf.ESGFCatalog()
            try:
                # intake-esgf (<= 2025.10) stores lists of dataset ids in DataFrame cells, which
                # pandas 3's default string columns refuse or mangle; object columns keep them
                with _object_strings():
                    catalog.search(quiet=True, **facets)
                    paths = catalog.to_path_dict(minimal_keys=False, quiet=True)
            except NoSearchResults as err:
                raise FileNotFoundError(
                    f"ESGF has no CMIP6 dataset for {group} of {source_id} {experiment} "
                    f"{member} {tab} (or no index answered: check the network); try another "
                    "member or experiment"
                ) from err
            except Exception as err:
                raise RuntimeError(
                    f"ESGF search/download for {group} of {source_id} {experiment} {member} "
                    f"{tab} failed: {type(err).__name__}: {err}"
                ) from err
            by_var: dict[str, list[Path]] = {}
            for key, files in paths.items():
                # full keys: CMIP6.<activity>.<inst>.<source>.<exp>.<member>.<table>.<var>.<grid>
                variable = str(key).split(".")[-2]
                by_var.setdefault(variable, []).extend(Path(f) for f in files)
            for name in group:
                if not by_var.get(name):
                    raise FileNotFoundError(
                        f"ESGF returned no files for {name} of {source_id} {experiment} "
                        f"{member} {tab}; it returned {sorted(by_var)}"
                    )
                out[name] = _latest_dataset(sorted(by_var[name]))
    return out


def open_cmip6(
    paths: dict[str, list[Path]] | list[Path],
    variables: list[str],
    period: dict | None = None,
) -> xr.Dataset:
    """Read CMIP6 files into canonical form under the ERA5 names the model was trained on.

    `variables` may be config long names, registry short names or CMIP6 names; `period`
    ({"start": "YYYY-MM-DD", "end": "YYYY-MM-DD"}, inclusive) selects dates after the calendar
    conversion. Static variables (orog, sftlf->lsm) come back too: use `split_statics`.
    """
    if isinstance(paths, dict):
        files = [Path(p) for group in paths.values() for p in group]
    else:
        files = [Path(p) for p in paths]
    if not files:
        raise ValueError("open_cmip6: no files given; run find_local_cmip6 or search_esgf first")
    if period:
        files = [f for f in files if _overlaps(f, period)]
        if not files:
            raise ValueError(f"open_cmip6: no file covers the period {period}")
    datasets = []
    for path in files:
        if not Path(path).exists():
            raise FileNotFoundError(f"CMIP6 file {path} does not exist")
        datasets.extend(_open_canonical(Path(path)))
    ds = _combine(datasets, files)
    if len(files) > 1:
        ds.encoding["source"] = f"{files[0]} ... {files[-1]} ({len(files)} files)"
    ds = canonicalize(ds, [_long_name(v) for v in variables])
    if period and "time" in ds.dims:
        ds = _select_period(ds, period)
    return ds


# --- helpers --------------------------------------------------------------------------------


@contextlib.contextmanager
def _object_strings() -> Iterator[None]:
    """pandas option context with object (not str-dtype) string columns, where it exists."""
    with warnings.catch_warnings():
        # the option is deprecated in pandas 3 (removed in 4); intake-esgf needs it meanwhile
        warnings.filterwarnings("ignore", message=".*future.infer_string.*")
        try:
            pd.get_option("future.infer_string")
        except (KeyError, pd.errors.OptionError):
            yield
            return
        with pd.option_context("future.infer_string", False):
            yield


def _glob(pattern: Path) -> list[str]:
    return glob.glob(str(pattern))


def _latest_dataset(files: list[Path]) -> list[Path]:
    """Keep the files of one dataset (one directory): preferred grid, then latest version."""
    by_dir: dict[Path, list[Path]] = {}
    for f in files:
        by_dir.setdefault(f.parent, []).append(f)
    rank = {g: i for i, g in enumerate(GRID_PREFERENCE)}

    def order(directory: Path) -> tuple:
        grid, version = directory.parent.name, directory.name
        # best grid first, then the newest version (vYYYYMMDD sorts as text), then the path
        return (rank.get(grid, len(rank)), grid, _negate(version), str(directory))

    best = min(by_dir, key=order)
    if len(by_dir) > 1:
        log.info("several CMIP6 datasets found; using %s", best)
    return sorted(by_dir[best])


def _negate(text: str) -> tuple[int, ...]:
    """Sort key that puts the largest string first."""
    return tuple(-ord(c) for c in text)


_RANGE = re.compile(r"_(\d{4,12})-(\d{4,12})\.nc$")


def _date_tuple(text: str) -> tuple[int, int, int]:
    """(Y, M, D) of a DRS date stamp; tuples compare on any calendar (360_day has Feb 30)."""
    year, month, day = int(text[:4]), int(text[4:6] or 1), int(text[6:8] or 1)
    return year, month, day


def _overlaps(path: Path, period: dict) -> bool:
    """Whether the file's name-encoded date range overlaps the period (True if unknown)."""
    match = _RANGE.search(Path(path).name)
    if not match:
        return True
    first, last = (_date_tuple(g) for g in match.groups())
    if len(match.group(2)) == 6:  # monthly stamps: the file runs to that month's end
        last = (last[0], last[1], 31)
    start, end = pd.Timestamp(period.get("start", "0001-01-01")), pd.Timestamp(
        period.get("end", "9999-12-31"))
    return first <= (end.year, end.month, end.day) and last >= (
        start.year, start.month, start.day)


def _select_period(ds: xr.Dataset, period: dict) -> xr.Dataset:
    """Inclusive date selection; the end date includes its whole day."""
    start, end = period.get("start"), period.get("end")
    out = ds.sel(time=slice(start, end))
    if out.sizes["time"] == 0:
        times = ds.indexes["time"]
        raise ValueError(
            f"no time step in period {start}..{end}; the files cover "
            f"{times.min():%Y-%m-%d}..{times.max():%Y-%m-%d}"
        )
    return out


__all__ = [
    "CMIP6_NAMES", "cmip6_name", "esgf_path", "find_local_cmip6", "open_cmip6", "search_esgf",
]


# ---------------------------------------------------------------------------------------------
# The CDS dataset projections-cmip6: request planning and download (client in cds.py)
# ---------------------------------------------------------------------------------------------

# registry long name / CMIP short name -> (CDS projections-cmip6 variable, CMIP short name)
CMIP6_VARIABLES: dict[str, tuple[str, str]] = {
    "2m_temperature": ("near_surface_air_temperature", "tas"),
    "total_precipitation": ("precipitation", "pr"),
    "10m_u_component_of_wind": ("eastward_near_surface_wind", "uas"),
    "10m_v_component_of_wind": ("northward_near_surface_wind", "vas"),
    "minimum_2m_temperature_since_previous_post_processing": (
        "daily_minimum_near_surface_air_temperature", "tasmin",
    ),
    "maximum_2m_temperature_since_previous_post_processing": (
        "daily_maximum_near_surface_air_temperature", "tasmax",
    ),
}
_CMIP6_BY_ANY = {
    **{k: v for k, v in CMIP6_VARIABLES.items()},
    **{v[1]: v for v in CMIP6_VARIABLES.values()},
    **{v[0]: v for v in CMIP6_VARIABLES.values()},
}


def _cds_experiment(name: str) -> str:
    """`ssp245` / `SSP2-4.5` -> the CDS spelling `ssp2_4_5`; `historical` unchanged."""
    n = name.strip().lower()
    m = re.fullmatch(r"ssp(\d)[-_]?(\d)[._]?(\d)", n)
    return f"ssp{m.group(1)}_{m.group(2)}_{m.group(3)}" if m else n


def plan_cmip6_requests(config: Mapping[str, Any]) -> list[Request]:
    """One projections-cmip6 request per variable and year (the answer is a zip of netCDF)."""
    import pandas as pd

    c6 = config.get("cmip6") or {}
    for k in ("model", "experiment"):
        if not c6.get(k):
            raise CDSError(f"config key cmip6.{k} is required to fetch CMIP6 from the CDS")
    if config["frequency"] != "daily":
        raise CDSError("projections-cmip6 on the CDS has no hourly data: set frequency: daily")
    names = c6.get("variables") or config.get("variables") or []
    unknown = [n for n in names if n not in _CMIP6_BY_ANY]
    if unknown:
        raise CDSError(
            f"cmip6.variables {unknown} have no CDS projections-cmip6 equivalent; choose from "
            f"{sorted(CMIP6_VARIABLES)} or their CMIP names "
            f"{[v[1] for v in CMIP6_VARIABLES.values()]}"
        )
    model = str(c6["model"]).strip().lower().replace("-", "_")
    experiment = _cds_experiment(str(c6["experiment"]))
    period = config["period"]
    days = pd.date_range(period["start"], period["end"], freq="D")
    area = request_area(config.get("region"))
    out = []
    for name in names:
        cds_var, short = _CMIP6_BY_ANY[name]
        for year in sorted({d.year for d in days}):
            months = sorted({d.month for d in days if d.year == year})
            req: dict[str, Any] = {
                "temporal_resolution": "daily",
                "experiment": experiment,
                "variable": cds_var,
                "model": model,
                "year": [str(year)],
                "month": [f"{m:02d}" for m in months],
            }
            if area is not None:
                req["area"] = area
            out.append(
                Request(
                    dataset="projections-cmip6",
                    request=req,
                    target=Path("cmip6") / f"{model}_{experiment}_{short}_{year}.zip",
                    variables=(short,),
                    label=f"{cds_var} {model} {experiment} {year}",
                    fields=len([d for d in days if d.year == year]),
                )
            )
    return out


def _extract(zip_path: Path, dest: Path) -> list[Path]:
    """Extract the netCDF members of a CDS zip answer atomically; skip provenance files."""
    out = []
    with zipfile.ZipFile(zip_path) as zf:
        for member in zf.namelist():
            if not member.endswith(".nc"):
                continue
            final = dest / Path(member).name
            info = zf.getinfo(member)
            if final.is_file() and final.stat().st_size == info.file_size:
                out.append(final)
                continue
            with atomic_path(final) as tmp, zf.open(member) as src:
                tmp.write_bytes(src.read())
            out.append(final)
    return out


def fetch_cmip6_cds(
    config: dict, raw_dir: Path, client_factory: Callable[[str, str], Any] | None = None
) -> list[Path]:
    """Fetch CMIP6 from the CDS dataset projections-cmip6; return the extracted netCDF paths.

    Calendars and units are left as the model wrote them (converted later). The CDS offers one
    ensemble member per model; when cmip6.member is set and the files carry another, a warning
    says so.
    """
    raw_dir = Path(raw_dir)
    reqs = plan_cmip6_requests(config)
    factory = client_factory or _default_factory(config, "cmip6")
    # retry/parallel settings: cmip6.* when given, else era5.* (fetch reads the era5 section)
    settings = {**config, "era5": {**(config.get("era5") or {}), **(config.get("cmip6") or {})}}
    zips = fetch(reqs, raw_dir, settings, client_factory=factory, progress=False)
    out: list[Path] = []
    for zp in zips:
        out.extend(_extract(zp, zp.with_suffix("")))
    member = (config.get("cmip6") or {}).get("member")
    if member and out and not any(member in p.name for p in out):
        warnings.warn(
            f"cmip6.member {member!r} is not in the CDS files {[p.name for p in out][:3]}; the "
            "CDS serves one member per model.",
            stacklevel=2,
        )
    return out
