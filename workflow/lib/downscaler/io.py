"""Atomic writers: every output appears under its final name only once it is complete.

An interrupted run must never leave a file that Snakemake (or a resumed run) would take as
done, so each writer writes to a temporary sibling and renames it into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        _remove(final)
        os.replace(tmp, final)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_netcdf(ds: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """Write an xarray Dataset to netCDF atomically."""
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, **kwargs)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically (indented, so people can read it)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())
