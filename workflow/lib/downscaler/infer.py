"""Downscaling inference: coarse fields -> tiles with halos -> model -> crop & stitch -> file.

The same tiling as training (from the checkpoint), so each tile sees exactly the context it was
trained with; halos are cropped (or blended) and the cores pasted back, then de-normalised
(precipitation clipped at 0). The period is processed in chunks of time steps and each chunk is
appended to the output as soon as it is computed (netCDF with an unlimited time dimension, or
zarr appended along time), so memory is bounded by one chunk whatever the length of the period.
With `processes > 1` the time range is split into contiguous parts, each downscaled by its own
local process into its own part file, and the parts are then streamed into the final file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

import downscaler
from downscaler.io import atomic_path
from downscaler.pairs import denormalise
from downscaler.settings import (
    EnsembleConfig,
    InferConfig,
    as_dict,
    from_schema,
    schema_defaults,
)
from downscaler.tiles_store import is_periodic, normalised_stack
from downscaler.tiling import check_tiling, stitch, tile
from downscaler.variables import BY_SHORT_NAME

FORMATS = ("netcdf", "zarr")
# Time is written as float64 hours since the first day of the output, so any step (hourly,
# daily, 3-hourly) is exact and appended chunks share one encoding.
_TIME_DTYPE = "float64"


def check_grids(coarse: xr.Dataset, fine_static: xr.Dataset, factor: int) -> None:
    """Raise a ValueError unless the fine statics are the exact `factor`-fold refinement of the
    input's coarse grid (the model only works on the grid it was trained on)."""
    for dim in ("lat", "lon"):
        n_c, n_f = coarse.sizes.get(dim, 0), fine_static.sizes.get(dim, 0)
        if n_f != factor * n_c:
            raise ValueError(
                f"the fine statics have {n_f} points in {dim}, not {factor} x the {n_c} of the "
                f"coarse input: regrid the input onto the model's coarse grid "
                f"(results/pairs/coarse.nc) first"
            )
        if n_c > 1:
            centres = fine_static[dim].values.reshape(n_c, factor).mean(axis=1)
            step = abs(float(np.diff(coarse[dim].values).mean()))
            if not np.allclose(centres, coarse[dim].values, atol=1e-3 * step, rtol=0):
                raise ValueError(
                    f"the coarse input's {dim} coordinates are not the model's coarse grid "
                    f"(they must be the block centres of the fine statics): regrid the input onto "
                    f"results/pairs/coarse.nc's grid first"
                )


def _tiling(payload: dict, halo: int | None, div: tuple[int, int] | None) -> dict:
    """The checkpoint's tiling, optionally with another halo or tile count (seam check)."""
    t = dict(payload["tiling"])
    if halo is not None:
        t["halo"] = int(halo)
    if div is not None:
        t["div_lat"], t["div_lon"] = int(div[0]), int(div[1])
    return t


def io_variables(payload: dict) -> tuple[list[str], list[str]]:
    """(input variables, target variables) of a checkpoint: its explicit lists when it has them
    (`inputs`/`targets`, or the model's `in_vars`/`out_vars`), else `variables` for both."""
    mc = payload.get("model_config", {})
    inputs = payload.get("inputs") or mc.get("in_vars") or payload["variables"]
    targets = payload.get("targets") or mc.get("out_vars") or payload["variables"]
    return list(inputs), list(targets)


def enable_mc_dropout(model: torch.nn.Module) -> int:
    """Put only the dropout layers of an eval-mode model in training mode (MC dropout); returns
    how many have a non-zero rate. Attention reads `self.training` for its own dropout."""
    from downscaler.model.layers import Attention

    active = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.train()
            active += module.p > 0
        elif isinstance(module, Attention):
            module.train()
            active += module.dropout > 0
    return active


def missing_output_mask(missing: np.ndarray, inputs: list[str], targets: list[str],
                        factor: int) -> np.ndarray:
    """[t, T, k h, k w] bool: the fine pixels that truly lack data.

    `missing` is [t, V, h, w] (NaN coarse inputs). A target that is also an input lacks data
    under its own missing coarse cells; a target that is not an input lacks data only where
    every input is missing. The inputs themselves are filled with 0 (the train mean), exactly as
    the tile writer does for training, so a missing cell never blanks its neighbours.
    """
    none_valid = missing.all(axis=1)
    per_target = np.stack([missing[:, inputs.index(v)] if v in inputs else none_valid
                           for v in targets], axis=1)
    return per_target.repeat(factor, axis=-2).repeat(factor, axis=-1)


@torch.no_grad()
def downscale_chunks(
    model: torch.nn.Module | list[torch.nn.Module],
    payload: dict,
    coarse: xr.Dataset,
    fine_static: xr.Dataset,
    batch_size: int = schema_defaults("infer").batch_size,
    blend: bool = schema_defaults("infer").blend,
    time_chunk: int = schema_defaults("infer").time_chunk,
    *,
    halo: int | None = None,
    div: tuple[int, int] | None = None,
    progress: bool = True,
    mc_members: int = 0,
    seed: int = 0,
    time_offset: int = 0,
) -> Iterator[xr.Dataset]:
    """Yield the fine fields (physical units) for `time_chunk` steps of `coarse` at a time.

    Only one chunk of inputs, tiles and outputs is ever in memory. `halo` / `div` override the
    checkpoint's tiling (used by the TILES seam check: halo 0, or one tile for the whole domain).
    Missing (NaN) coarse inputs are set to 0 in normalised space as in training, and only the
    fine pixels under them are NaN in the output (`missing_output_mask`).

    Ensembles: `model` may be a list (a deep ensemble of checkpoints sharing one payload), and
    `mc_members` > 0 draws that many MC-dropout samples of each model (dropout on, seeded by
    `seed`, the member and the chunk's first time index counted from `time_offset`: the same
    run with the same time_chunk and processes draws the same masks). Then every variable has
    a `member` dimension (time, member, lat, lon); otherwise (time, lat, lon) as before.
    """
    if time_chunk < 1:
        raise ValueError(f"infer.time_chunk must be >= 1, got {time_chunk}")
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    ensemble = len(models) > 1 or mc_members > 0
    statics, stats = payload["statics"], payload["stats"]
    inputs, targets = io_variables(payload)
    t = _tiling(payload, halo, div)
    missing = [v for v in inputs if v not in coarse]
    missing += [s for s in statics if s not in fine_static]
    if missing:
        raise KeyError(f"the input lacks {missing}, which the checkpoint was trained with")
    factor, halo_c = t["factor"], t["halo"]
    check_grids(coarse, fine_static, factor)
    patch = payload.get("model_config", {}).get("patch_size", 1)
    check_tiling((coarse.sizes["lat"], coarse.sizes["lon"]), t["div_lat"], t["div_lon"], halo_c,
                 patch)
    periodic = is_periodic(coarse["lon"].values)
    opts = {"periodic_lon": periodic, "pad_mode": t["pad_mode"]}
    static_tiles = tile(normalised_stack(fine_static, statics, stats),
                        t["div_lat"], t["div_lon"], factor * halo_c, **opts)
    static_tiles = torch.from_numpy(np.swapaxes(static_tiles, 0, 1).copy())  # [N, S, ...]
    n_tiles = static_tiles.shape[0]
    coords = {"lat": fine_static["lat"], "lon": fine_static["lon"]}
    for m in models:
        m.eval()
        if mc_members and not enable_mc_dropout(m):
            raise ValueError("infer.ensemble.mc_dropout needs a model trained with dropout: "
                             "set model.dropout > 0 (e.g. 0.1) and train again, or use "
                             "infer.ensemble.checkpoints (a deep ensemble) instead")
    draws = [(m, d) for m in models for d in range(max(1, mc_members))]

    starts = range(0, coarse.sizes["time"], time_chunk)
    for t0 in tqdm(starts, desc="downscale", unit="chunk", disable=not progress):
        part = coarse.isel(time=slice(t0, t0 + time_chunk))
        stack = normalised_stack(part, inputs, stats)  # [t, V, h, w]
        lacking = np.isnan(stack)
        stack[lacking] = 0.0  # as the tile writer does for training (tiles_store.write_tiles)
        x = tile(stack, t["div_lat"], t["div_lon"], halo_c, **opts)  # [t, V, N, h, w]
        steps = x.shape[0]
        x = torch.from_numpy(np.swapaxes(x, 1, 2).reshape(steps * n_tiles, *x.shape[1:2],
                                                          *x.shape[3:]).copy())
        static = static_tiles.repeat(steps, 1, 1, 1)
        fields = []
        for member, (m, _) in enumerate(draws):
            if mc_members:
                torch.manual_seed(seed * 1_000_003 + member * 7_919 + time_offset + t0)
            pred = torch.cat([m(x[i:i + batch_size], static[i:i + batch_size], payload["res_km"])
                              for i in range(0, len(x), batch_size)])
            pred = pred.reshape(steps, n_tiles, len(targets), *pred.shape[-2:]).numpy()
            fields.append(stitch(np.swapaxes(pred, 1, 2), t["div_lat"], t["div_lon"],
                                 factor * halo_c, blend=blend, periodic_lon=periodic))
        field = np.stack(fields, axis=1)  # [t, member, T, H, W]
        absent = missing_output_mask(lacking, inputs, targets, factor)[:, None]
        dims = ("time", "member", "lat", "lon") if ensemble else ("time", "lat", "lon")
        data = {}
        for v, name in enumerate(targets):
            values = denormalise(field[:, :, v].astype("float64"), stats[name]).astype("float32")
            values[np.broadcast_to(absent[:, :, v], values.shape)] = np.nan
            data[name] = (dims, values if ensemble else values[:, 0], cf_attrs(name))
        extra = {"member": ("member", np.arange(len(draws)), MEMBER_ATTRS)} if ensemble else {}
        yield xr.Dataset(data, coords={"time": part["time"], **extra, **coords})


MEMBER_ATTRS = {"standard_name": "realization", "long_name": "ensemble member",
                "units": "1"}


def downscale(model: torch.nn.Module, payload: dict, coarse: xr.Dataset,
              fine_static: xr.Dataset, **options) -> xr.Dataset:
    """The whole prediction in memory (for short periods and tests); `options` and their
    defaults are `downscale_chunks`'."""
    chunks = list(downscale_chunks(model, payload, coarse, fine_static, **options))
    return xr.concat(chunks, dim="time") if len(chunks) > 1 else chunks[0]


def cf_attrs(name: str) -> dict:
    """CF variable attributes from the variable registry."""
    meta = BY_SHORT_NAME[name]
    return {"units": meta.units, "standard_name": meta.standard_name,
            "long_name": f"downscaled {meta.long_name.replace('_', ' ')}"}


def provenance(payload: dict, checkpoint_sha256: str, **extra: str) -> dict:
    """Global attributes: CF conventions, the training config, the weights' hash, versions."""
    return {
        "Conventions": "CF-1.10",
        "title": "Downscaled fields (Reslim + TILES)",
        "source": f"downscaler {downscaler.__version__}, "
                  f"{payload.get('architecture', 'Reslim')}",
        "history": f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} downscaled",
        "checkpoint_sha256": checkpoint_sha256,
        "config": json.dumps(payload.get("config", {}), sort_keys=True),
        "tiling": json.dumps(payload.get("tiling", {}), sort_keys=True),
        "software": f"python {platform.python_version()}, torch {torch.__version__}, "
                    f"xarray {xr.__version__}, numpy {np.__version__}",
        **extra,
    }


def _with_coord_attrs(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    ds["lat"].attrs.update(units="degrees_north", standard_name="latitude", axis="Y",
                           long_name="latitude")
    ds["lon"].attrs.update(units="degrees_east", standard_name="longitude", axis="X",
                           long_name="longitude")
    ds["time"].attrs.update(standard_name="time", axis="T", long_name="time")
    return ds


def _time_encoding(time: xr.DataArray) -> dict:
    calendar = time.dt.calendar if time.size else "proleptic_gregorian"
    first = time.values[0]
    day = (np.datetime_as_string(first, unit="D") if isinstance(first, np.datetime64)
           else first.strftime("%Y-%m-%d"))
    return {"units": f"hours since {day}", "calendar": calendar, "dtype": _TIME_DTYPE}


class StreamWriter:
    """Append time chunks to a netCDF (unlimited time) or zarr store at `path`, atomically.

    Use as a context manager: the file appears under its final name only after `close()` of a
    successful block. `chunk_sizes` records the time steps of every append (tests use it to check
    that no more than one chunk is ever handed over at once).
    """

    def __init__(self, path: str | os.PathLike, fmt: str = "netcdf", attrs: dict | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"infer.format must be one of {FORMATS}, got {fmt!r}")
        self.path, self.fmt, self.attrs = Path(path), fmt, dict(attrs or {})
        self.chunk_sizes: list[int] = []
        self._nc = None
        self._time_enc: dict | None = None

    def __enter__(self) -> StreamWriter:
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        return self

    def append(self, chunk: xr.Dataset) -> None:
        """Write one chunk of time steps after those already written."""
        steps = chunk.sizes["time"]
        if steps == 0:
            return
        if not self.chunk_sizes:
            self._create(chunk)
        elif self.fmt == "zarr":
            # xarray rewrites the store's attributes on append: hand over the full set again.
            chunk = _with_coord_attrs(chunk)
            chunk.attrs = dict(self.attrs)
            chunk.to_zarr(self._tmp, append_dim="time", zarr_format=3, consolidated=False)
        else:
            self._append_netcdf(chunk)
        self.chunk_sizes.append(steps)

    def _create(self, chunk: xr.Dataset) -> None:
        ds = _with_coord_attrs(chunk)
        ds.attrs.update(self.attrs)
        # one time step (of every member) per chunk
        chunks = {v: tuple(1 if d == "time" else ds.sizes[d] for d in ds[v].dims)
                  for v in ds.data_vars}
        self._time_enc = _time_encoding(ds["time"])
        if self.fmt == "zarr":
            enc = {v: {"chunks": chunks[v]} for v in ds.data_vars}
            enc["time"] = dict(self._time_enc)
            ds.to_zarr(self._tmp, mode="w", encoding=enc, zarr_format=3, consolidated=False)
            return
        enc = {v: {"zlib": True, "complevel": 4, "chunksizes": chunks[v],
                   "dtype": "float32"} for v in ds.data_vars}
        enc["time"] = dict(self._time_enc)
        ds.to_netcdf(self._tmp, unlimited_dims=["time"], encoding=enc, engine="netcdf4")
        import netCDF4

        self._nc = netCDF4.Dataset(self._tmp, "a")

    def _append_netcdf(self, chunk: xr.Dataset) -> None:
        from xarray.coding.times import encode_cf_datetime

        nc, enc = self._nc, self._time_enc
        n, steps = len(nc.dimensions["time"]), chunk.sizes["time"]
        values, _, _ = encode_cf_datetime(chunk["time"].values, enc["units"], enc["calendar"],
                                          dtype=np.dtype(_TIME_DTYPE))
        nc["time"][n:n + steps] = values
        for name in chunk.data_vars:
            nc[name][n:n + steps] = chunk[name].transpose(*nc[name].dimensions).values

    def close(self, ok: bool = True) -> None:
        if self._nc is not None:
            self._nc.close()
            self._nc = None
        if ok and not self.chunk_sizes:
            self._atomic.__exit__(ValueError, ValueError("nothing to write"), None)
            raise ValueError(f"no time steps to write to {self.path}: the input selection is "
                             f"empty")
        if ok:
            self._atomic.__exit__(None, None, None)
        else:
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def write_stream(chunks: Iterable[xr.Dataset], path: str | os.PathLike, fmt: str = "netcdf",
                 attrs: dict | None = None) -> list[int]:
    """Append every chunk to `path` as it arrives; returns the time steps of each append."""
    with StreamWriter(path, fmt, attrs) as writer:
        for chunk in chunks:
            writer.append(chunk)
    return writer.chunk_sizes


def open_downscaled(path: str | os.PathLike, **kwargs) -> xr.Dataset:
    """Open a downscaled output written by this module, netCDF or zarr."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"downscaled output {path} does not exist: run the infer rule")
    if path.is_dir():
        return xr.open_zarr(path, consolidated=False, **kwargs)
    return xr.open_dataset(path, **kwargs)


def select_period(coarse: xr.Dataset, period: dict | None) -> xr.Dataset:
    """The inclusive date range `period` ({start, end}) of `coarse`, or all of it."""
    if not period:
        return coarse
    part = coarse.sel(time=slice(period["start"], f"{period['end']}T23:59:59"))
    if part.sizes["time"] == 0:
        raise ValueError(f"the period {period['start']}..{period['end']} selects no time step "
                         f"of the inference input")
    return part


def _part_bounds(n_time: int, processes: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [start, stop) index ranges, one per process, none empty."""
    processes = max(1, min(processes, n_time))
    edges = np.linspace(0, n_time, processes + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def load_model(checkpoint: str | os.PathLike,
               architecture: str = "reslim") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, payload) from a checkpoint: Reslim, or the upsample-first ViT
    baseline (same config and payload layout, other class)."""
    from downscaler.checkpoint import load_checkpoint

    model, payload = load_checkpoint(checkpoint, architecture)
    payload.setdefault("architecture", architecture)
    return model, payload


def load_members(checkpoint: str | os.PathLike, architecture: str = "reslim",
                 ensemble: EnsembleConfig | None = None) -> tuple[list[torch.nn.Module], dict]:
    """The models of a run and the payload they share: the checkpoint, plus for a deep
    ensemble (`ensemble.checkpoints`) the other members, which must have been trained on
    the same variables, statics, statistics and tiling (otherwise a clear error)."""
    model, payload = load_model(checkpoint, architecture)
    models = [model]
    for other in ensemble.checkpoints if ensemble else ():
        m, p = load_model(other, architecture)
        for key in ("variables", "statics", "stats", "tiling"):
            if p.get(key) != payload.get(key):
                raise ValueError(
                    f"infer.ensemble.checkpoints: {other} was trained with other {key} than "
                    f"{checkpoint}; deep-ensemble members must come from the same config "
                    f"(change only the seed)")
        models.append(m)
    return models, payload


def ensemble_options(ensemble: EnsembleConfig | None) -> dict:
    """downscale_chunks keywords for an `infer.ensemble` config (None: deterministic)."""
    if ensemble is None:
        return {}
    return {"mc_members": ensemble.mc_dropout, "seed": ensemble.seed}


def _downscale_part(checkpoint: str, architecture: str, coarse_path: str, static_path: str,
                    period: dict | None, bounds: tuple[int, int], out: str, options: dict,
                    threads: int, ensemble: EnsembleConfig | None = None) -> list[int]:
    """Worker: downscale time steps [bounds) of the selection into its own netCDF part."""
    torch.set_num_threads(max(1, threads))
    models, payload = load_members(checkpoint, architecture, ensemble)
    with xr.open_dataset(coarse_path) as coarse, xr.open_dataset(static_path) as static:
        part = select_period(coarse, period).isel(time=slice(*bounds))
        chunks = downscale_chunks(models, payload, part, static[payload["statics"]].load(),
                                  progress=False, time_offset=bounds[0],
                                  **ensemble_options(ensemble), **options)
        return write_stream(chunks, out, "netcdf")


class MaskedTally:
    """Counts the NaN (masked) output pixels of each variable while chunks stream past."""

    def __init__(self) -> None:
        self.masked: dict[str, int] = {}
        self.total: dict[str, int] = {}

    def watch(self, chunks: Iterable[xr.Dataset]) -> Iterator[xr.Dataset]:
        for chunk in chunks:
            for name, da in chunk.data_vars.items():
                self.masked[name] = self.masked.get(name, 0) + int(np.isnan(da.values).sum())
                self.total[name] = self.total.get(name, 0) + da.size
            yield chunk

    def fractions(self) -> dict[str, float]:
        return {v: self.masked[v] / self.total[v] for v in self.total if self.total[v]}

    def summary(self) -> str:
        parts = [f"{v} {100 * f:.4g}%" for v, f in self.fractions().items()]
        return ("masked output (fine pixels under missing coarse inputs): "
                + (", ".join(parts) or "none"))


def _stream_parts(parts: list[str], time_chunk: int) -> Iterator[xr.Dataset]:
    """Read the part files back one chunk at a time, in order."""
    for path in parts:
        with xr.open_dataset(path) as part:
            for t0 in range(0, part.sizes["time"], time_chunk):
                yield part.isel(time=slice(t0, t0 + time_chunk)).load()


def run_inference(
    checkpoint: str | os.PathLike,
    coarse_path: str | os.PathLike,
    static_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    period: dict | None = None,
    settings: InferConfig | Mapping | None = None,
    architecture: str = "reslim",
    tally: MaskedTally | None = None,
) -> list[int]:
    """Downscale a coarse file (optionally one period of it) into `out`, streaming by chunk.

    `settings` is the `infer` config section (a plain mapping, e.g. {time_chunk: 2}, is
    completed from the schema). `static_path` holds the fine statics (results/pairs/fine.nc).
    With `settings.processes > 1` the time range is split across that many local processes
    (spawned; torch threads shared out), each writes a part, and the parts are streamed into
    `out`. The checkpoint holds `architecture` (see `load_model`). An active
    `settings.ensemble` writes a `member` dimension (see `downscale_chunks`); it applies to the
    model's own runs only, not to a learned baseline's (`architecture` other than reslim).
    `tally` counts the masked output pixels. Returns the time steps of each append to `out`
    (never more than `time_chunk`).
    """
    from downscaler.checkpoint import file_sha256

    settings = from_schema("infer", settings or {})
    fmt, time_chunk = settings.format, settings.time_chunk
    if fmt not in FORMATS:
        raise ValueError(f"infer.format must be one of {FORMATS}, got {fmt!r}")
    ensemble = settings.ensemble if architecture == "reslim" else None
    tally = tally if tally is not None else MaskedTally()
    models, payload = load_members(checkpoint, architecture, ensemble)
    extra = {}
    if ensemble and ensemble.active:
        extra["ensemble"] = json.dumps(as_dict(ensemble), sort_keys=True)
    attrs = provenance(payload, file_sha256(checkpoint),
                       input_file=str(coarse_path),
                       period=json.dumps(period or "all", sort_keys=True), **extra)
    options = {"batch_size": settings.batch_size, "blend": settings.blend,
               "time_chunk": time_chunk}
    with xr.open_dataset(coarse_path) as coarse:
        n_time = select_period(coarse, period).sizes["time"]
    bounds = _part_bounds(n_time, settings.processes)
    if len(bounds) <= 1:
        with xr.open_dataset(coarse_path) as coarse, xr.open_dataset(static_path) as static:
            chunks = downscale_chunks(models, payload, select_period(coarse, period),
                                      static[payload["statics"]].load(),
                                      **ensemble_options(ensemble), **options)
            return write_stream(tally.watch(chunks), out, fmt, attrs)

    threads = max(1, (os.cpu_count() or 1) // len(bounds))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.parts-", dir=out.parent) as tmp:
        parts = [str(Path(tmp) / f"part{i:04d}.nc") for i in range(len(bounds))]
        ctx = get_context("spawn")  # fork after torch initialised its thread pool can hang
        with ProcessPoolExecutor(max_workers=len(bounds), mp_context=ctx) as pool:
            jobs = [pool.submit(_downscale_part, str(checkpoint), architecture, str(coarse_path),
                                str(static_path), period, b, part, options, threads, ensemble)
                    for b, part in zip(bounds, parts, strict=True)]
            for job in jobs:
                job.result()  # re-raises a worker's error here
        return write_stream(tally.watch(_stream_parts(parts, time_chunk)), out, fmt, attrs)
