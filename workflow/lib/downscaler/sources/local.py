"""The `local` source: read existing files of any usual provenance into canonical form.

Accepts netCDF (new-CDS layout with valid_time/pressure_level/number/expver, or old-style),
the zip archives the CDS returns (one netCDF member per stepType, merged here), GRIB (via
cfgrib + eccodes), and zarr stores. Several files are combined: split by time they are
concatenated along time, split by variable they are merged. Every file is canonicalised on its
own first, so files of different provenance can be mixed.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import xarray as xr

from downscaler.io import atomic_path
from downscaler.sources.canonical import canonicalize, check_plausible, split_statics

log = logging.getLogger(__name__)

GRIB_SUFFIXES = (".grib", ".grb", ".grib2", ".grb2", ".grib1", ".grb1")
_GLOB_CHARS = set("*?[")


def open_local(
    paths: str | os.PathLike | list[str | os.PathLike],
    variables: list[str] | None = None,
) -> tuple[xr.Dataset, xr.Dataset]:
    """Open files or glob patterns and return canonical (fields, static) datasets.

    `variables` are config long names (`2m_temperature`, ...); each must be found in the
    combined files, else a KeyError names what the files hold. Data stay lazy (dask) where the
    format allows it.
    """
    files = expand_paths(paths)
    datasets: list[xr.Dataset] = []
    for path in files:
        datasets.extend(_open_canonical(path))
    combined = _combine(datasets, files)
    if len(files) > 1:
        combined.encoding["source"] = f"{files[0]} ... {files[-1]} ({len(files)} files)"
    if variables is not None:
        # canonicalize is idempotent: here it only selects and checks the variables
        combined = canonicalize(combined, variables)
    return split_statics(combined)


def expand_paths(paths: str | os.PathLike | list[str | os.PathLike]) -> list[Path]:
    """Expand globs (and ~) into a sorted, de-duplicated list of existing paths."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if not paths:
        raise ValueError("open_local: no paths given; pass file names or glob patterns")
    out: list[Path] = []
    for entry in paths:
        text = os.path.expanduser(str(entry))
        if _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise FileNotFoundError(
                    f"no file matches the pattern {text!r}; check the path in config "
                    "(source paths) or download the data first"
                )
            out.extend(Path(m) for m in matches)
        else:
            path = Path(text)
            if not path.exists():
                raise FileNotFoundError(f"input file {path} does not exist; check the path")
            out.append(path)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def detect_format(path: Path) -> str:
    """Return 'zarr', 'zip', 'grib' or 'netcdf' from the file's layout and magic bytes."""
    if path.is_dir():
        markers = ("zarr.json", ".zgroup", ".zmetadata", ".zattrs")
        if path.suffix == ".zarr" or any((path / m).exists() for m in markers):
            return "zarr"
        raise ValueError(f"{path} is a directory but not a zarr store (no zarr.json/.zgroup)")
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic.startswith(b"PK\x03\x04") or zipfile.is_zipfile(path):
        return "zip"
    if magic.startswith(b"GRIB") or path.suffix.lower() in GRIB_SUFFIXES:
        return "grib"
    if magic.startswith((b"CDF", b"\x89HDF")):
        return "netcdf"
    raise ValueError(
        f"cannot read {path}: it is not netCDF, GRIB, a zip of netCDF files or a zarr store "
        f"(first bytes {magic!r}); is the download complete?"
    )


def _open_canonical(path: Path) -> list[xr.Dataset]:
    """Open one file (or zip/zarr) as a list of canonical datasets (several for zip/GRIB).

    Every value is read once here to check it is plausible (`check_plausible`): that also finds
    a file whose header is intact but whose data are cut short.
    """
    out = []
    for ds in _open_raw(path):
        ds = canonicalize(ds)
        try:
            check_plausible(ds, f"file {path}")
        except (OSError, RuntimeError) as err:
            raise ValueError(damaged(path, err)) from err
        out.append(ds)
    if len(out) > 1:  # zip members / GRIB hypercubes: different variables, same grid and times
        out = [_combine(out, [path] * len(out))]
    return out


def _open_raw(path: Path) -> list[xr.Dataset]:
    """Open one path as it is on disk; a zip yields its members (netCDF or GRIB)."""
    kind = detect_format(path)
    if kind == "zip":
        return [ds for member in _extract_zip(path) for ds in _open_raw(member)]
    try:
        if kind == "zarr":
            raw = [xr.open_zarr(path, chunks={})]
        elif kind == "grib":
            raw = _open_grib(path)
        else:
            raw = [_open_netcdf(path)]
    except (ImportError, FileNotFoundError):
        raise
    except OSError as err:  # netCDF/HDF5 "HDF error", "NetCDF: Not a valid ID", short reads
        raise ValueError(damaged(path, err)) from err
    except Exception as err:
        raise ValueError(f"cannot read {path} as {kind}: {type(err).__name__}: {err}") from err
    for ds in raw:
        ds.encoding.setdefault("source", str(path))
    return raw


def damaged(path: Path, err: BaseException) -> str:
    return (f"{path} is damaged or incomplete (truncated download or copy?): it cannot be read "
            f"({type(err).__name__}: {err}); download or copy it again")


def _open_netcdf(path: Path) -> xr.Dataset:
    ds = xr.open_dataset(path, chunks={})
    ds.encoding["source"] = str(path)
    return ds


def _open_grib(path: Path) -> list[xr.Dataset]:
    """Open a GRIB file with cfgrib; mixed stepTypes/levels come back as several datasets."""
    try:
        import cfgrib
    except ImportError as err:
        raise ImportError(
            f"reading the GRIB file {path} needs cfgrib and eccodes: "
            "pip install cfgrib eccodes (the eccodes wheel brings the ecCodes library), or ask "
            "the CDS for data_format: netcdf"
        ) from err
    # indexpath="" keeps cfgrib from writing .idx files next to (possibly read-only) data
    return cfgrib.open_datasets(str(path), backend_kwargs={"indexpath": ""})


def _extract_zip(path: Path) -> list[Path]:
    """Extract a CDS zip's netCDF members once, next to it (or in the temp dir if read-only).

    Extraction (not in-memory reading) keeps large members lazy; the directory is keyed on
    the zip's size and mtime, so a re-downloaded zip is extracted again.
    """
    with zipfile.ZipFile(path) as zf:
        members = [m for m in zf.namelist() if not m.endswith("/")]
        if not members:
            raise ValueError(f"the zip archive {path} is empty")
        stat = path.stat()
        tag = hashlib.sha1(
            f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
        ).hexdigest()[:10]
        candidates = [
            path.parent / f".{path.name}.{tag}.d",
            Path(tempfile.gettempdir()) / "downscaler-unzip" / f"{path.stem}.{tag}.d",
        ]
        for target in candidates:
            if target.is_dir():
                return sorted(target / Path(m).name for m in members)
            try:
                with atomic_path(target) as tmp:
                    tmp.mkdir()
                    for m in members:
                        # flatten member paths: never write outside the target directory
                        (tmp / Path(m).name).write_bytes(zf.read(m))
                return sorted(target / Path(m).name for m in members)
            except OSError as err:
                log.info("cannot extract %s into %s (%s); trying the next place", path,
                         target, err)
        raise OSError(f"cannot extract the zip archive {path}: no writable directory")


def _combine(datasets: list[xr.Dataset], files: list[Path]) -> xr.Dataset:
    """Concatenate along time and merge across variables; all must share one lat/lon grid."""
    if len(datasets) == 1:
        return datasets[0]
    ref = datasets[0]
    for ds, path in zip(datasets[1:], files[1:], strict=False):
        for dim in ("lat", "lon"):
            if ds.sizes[dim] != ref.sizes[dim] or not np.allclose(ds[dim], ref[dim]):
                raise ValueError(
                    f"{path} is on a different {dim} grid than {files[0]} "
                    f"({ds.sizes[dim]} vs {ref.sizes[dim]} points); regrid the files to "
                    "one grid or open them separately"
                )
    # Exactly the first grid everywhere, so float noise in coordinates cannot split it.
    datasets = [ds.assign_coords(lat=ref["lat"], lon=ref["lon"]) for ds in datasets]
    with_time = [ds for ds in datasets if "time" in ds.dims]
    without = [ds for ds in datasets if "time" not in ds.dims]
    try:
        parts = []
        if with_time:
            parts.append(
                xr.combine_by_coords(
                    with_time, data_vars="minimal", coords="minimal", compat="override",
                    join="outer", combine_attrs="drop_conflicts",
                )
            )
        parts.extend(without)
        combined = xr.merge(parts, compat="override", join="outer",
                            combine_attrs="drop_conflicts")
    except Exception as err:
        names = ", ".join(str(f) for f in dict.fromkeys(files))
        raise ValueError(
            f"cannot combine the files {names}: {err}. Files must not overlap in time for the "
            "same variable."
        ) from err
    if "time" in combined.dims:
        index = combined.indexes["time"]
        if index.has_duplicates:
            raise ValueError(f"duplicate time steps after combining {len(files)} files; "
                             "remove overlapping files (e.g. ERA5 and ERA5T of one month)")
    return combined
