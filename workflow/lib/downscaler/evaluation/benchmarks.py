"""Read the parallel package's benchmark JSON (benchmarks/results/*.json) into one tidy table.

The benchmark scripts (bench_tiles_scaling.py, bench_reslim_vs_baseline.py, bench_dchag_memory.py)
are written by other people and their layout is not fixed, so the reader is defensive: a file may
hold one record, a list of records, or a dict with a list under "runs" / "results" / "records"
(top-level scalars and dicts, such as the benchmark name or its "args", are copied into every
record); nested dicts are flattened. Each record is mapped to the columns below by looking for
common key names; records without a process count or domain size, or without a throughput (or
a time to derive one from), still load but cannot be drawn on that axis. Unreadable files are
reported, not fatal.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pandas as pd

COLUMNS = ["file", "series", "processes", "domain", "throughput", "throughput_unit",
           "efficiency"]

# Key aliases, most specific first; matched case-insensitively on the full flattened key or its
# last component.
PROCESS_KEYS = ("world_size", "processes", "n_processes", "num_processes", "nprocs", "n_procs",
                "ranks", "n_ranks", "gpus", "n_gpus", "num_gpus", "devices", "n_devices",
                "workers", "n_workers")
THROUGHPUT_KEYS = ("samples_per_s", "samples_per_sec", "samples_per_second", "samples/s",
                   "throughput", "images_per_s", "tiles_per_s", "it_per_s", "steps_per_s",
                   "tokens_per_s")
TIME_KEYS = ("step_s", "step_time_s", "median_s", "time_per_step", "seconds_per_step",
             "step_time", "sec_per_step", "time_s", "seconds", "wall_s", "elapsed_s", "elapsed",
             "time")
DOMAIN_KEYS = ("domain_pixels", "n_pixels", "pixels", "grid_points", "domain_size", "domain",
               "grid", "image_size", "tokens", "seq_len", "sequence_length")
# A single side length of a square domain (e.g. "coarse": 32 for a 32 x 32 coarse grid).
SIDE_KEYS = ("coarse", "coarse_size", "size", "side", "image_side")
DOMAIN_PAIRS = (("height", "width"), ("h", "w"), ("n_lat", "n_lon"), ("nlat", "nlon"),
                ("lat", "lon"))
SERIES_KEYS = ("series", "method", "model", "variant", "mode", "label", "name", "benchmark",
               "parallelism", "strategy")
EFFICIENCY_KEYS = ("efficiency", "scaling_efficiency", "parallel_efficiency")
BATCH_KEYS = ("batch_size", "global_batch_size", "batch")
# Run-level context, not part of a record: the machine / peak / versions block (read by
# `machine_labels`; a "machine.label" would read as a series name) and summaries.
CONTEXT_KEYS = ("machine", "peak", "versions", "summary", "command", "ratios", "table")
LIST_KEYS = ("runs", "results", "records", "cases", "measurements", "data", "entries",
             "points", "table")


def _flatten(obj: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _records(obj) -> list[dict]:
    """Records from any of the accepted layouts."""
    if isinstance(obj, list):
        return [r for item in obj for r in _records(item)]
    if not isinstance(obj, dict):
        return []
    for key in LIST_KEYS:
        if isinstance(obj.get(key), list):
            shared = _flatten({k: v for k, v in obj.items() if k != key
                               and k not in CONTEXT_KEYS and not isinstance(v, list)})
            return [{**shared, **r} for r in _records(obj[key])]
    return [_flatten(obj)]


def _find(record: dict, aliases: tuple[str, ...]):
    """The value of the first alias present (full key or last dotted component)."""
    lowered = {}
    for key, value in record.items():
        k = str(key).lower()
        lowered.setdefault(k, value)
        lowered.setdefault(k.rsplit(".", 1)[-1], value)
    for alias in aliases:
        if alias in lowered and lowered[alias] is not None:
            return alias, lowered[alias]
    return None, None


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _domain(record: dict) -> float | None:
    """Domain size in grid points: a number, [h, w], 'HxW', or a height/width pair of keys."""
    _, value = _find(record, DOMAIN_KEYS)
    if isinstance(value, (list, tuple)) and value and all(_number(v) for v in value):
        return float(math.prod(_number(v) for v in value))
    if isinstance(value, str):
        parts = re.split(r"\s*[x×,*]\s*", value.strip())
        if len(parts) > 1 and all(_number(p) for p in parts):
            return float(math.prod(_number(p) for p in parts))
    if _number(value):
        return _number(value)
    _, side = _find(record, SIDE_KEYS)
    if isinstance(side, str):
        parts = re.split(r"\s*[x×,*]\s*", side.strip())
        if len(parts) > 1 and all(_number(p) for p in parts):
            return float(math.prod(_number(p) for p in parts))
    if _number(side):
        return _number(side) ** 2
    for a, b in DOMAIN_PAIRS:
        _, va = _find(record, (a,))
        _, vb = _find(record, (b,))
        if _number(va) and _number(vb):
            return _number(va) * _number(vb)
    return None


def _row(record: dict, file: str) -> dict:
    key, throughput = _find(record, THROUGHPUT_KEYS)
    throughput = _number(throughput)
    unit = "samples/s" if key and key.startswith("samples") else (key or "")
    if throughput is None:
        tkey, seconds = _find(record, TIME_KEYS)
        seconds = _number(seconds)
        if seconds and seconds > 0:
            batch = _number(_find(record, BATCH_KEYS)[1])
            throughput = (batch or 1.0) / seconds
            unit = "samples/s" if batch else f"1/{tkey}"
    series = [str(v) for k in SERIES_KEYS
              if (v := _find(record, (k,))[1]) is not None and not isinstance(v, (dict, list))]
    eff = _number(_find(record, EFFICIENCY_KEYS)[1])
    # the script's options (e.g. "args.size" of a training step, "args.processes" listing every
    # count) are neither this record's domain size nor its process count
    measured = {k: v for k, v in record.items() if not k.startswith("args.")}
    return {
        "file": file,
        "series": f"{file}: {series[0]}" if series else file,
        "processes": _number(_find(measured, PROCESS_KEYS)[1]),
        "domain": _domain(measured),
        "throughput": throughput,
        "throughput_unit": unit.replace("_per_s", "/s"),
        "efficiency": eff,
    }


def load_benchmarks(directory: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """All benchmark records under `directory`/*.json as a table (COLUMNS), plus the problems
    met (unreadable files, files without records) as messages."""
    rows, problems = [], []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            obj = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            problems.append(f"{path.name}: unreadable ({err})")
            continue
        records = _records(obj)
        if not records:
            problems.append(f"{path.name}: no records")
        rows += [_row(r, path.stem) for r in records]
    return pd.DataFrame(rows, columns=COLUMNS), problems


def machine_labels(directory: str | os.PathLike) -> list[str]:
    """The machines the JSON under `directory` were measured on (their one-line labels)."""
    labels = set()
    for path in sorted(Path(directory).glob("*.json")):
        try:
            machine = json.loads(path.read_text()).get("machine")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(machine, dict):
            labels.add(machine.get("label") or f"{machine.get('hostname', '?')}: "
                       f"{machine.get('cpu', '?')}, torch {machine.get('torch', '?')}")
    return sorted(labels)


def scaling_efficiency(df: pd.DataFrame, by: str) -> pd.Series:
    """Efficiency relative to each series' smallest `by` (processes or domain size).

    Processes (strong scaling): (throughput(n) / n) / (throughput(n0) / n0); 1 is ideal linear
    speed-up. Domain size: (throughput(D) D) / (throughput(D0) D0), the grid points per second
    relative to the smallest domain; 1 means cost grows linearly with area (the TILES promise).
    Efficiencies given in the JSON are kept for the process axis (values above 1.5 are taken
    as percentages).
    """
    out = pd.Series(float("nan"), index=df.index)
    ok = df[by].notna() & df["throughput"].notna() & (df[by] > 0)
    for _, group in df[ok].groupby("series"):
        base = group.loc[group[by].idxmin()]
        if by == "processes":
            eff = (group["throughput"] / group[by]) / (base["throughput"] / base[by])
        else:
            eff = (group["throughput"] * group[by]) / (base["throughput"] * base[by])
        out.loc[group.index] = eff
    if by == "processes" and "efficiency" in df:
        given = df["efficiency"].notna()
        out[given] = df.loc[given, "efficiency"].where(df.loc[given, "efficiency"] <= 1.5,
                                                       df.loc[given, "efficiency"] / 100)
    return out
