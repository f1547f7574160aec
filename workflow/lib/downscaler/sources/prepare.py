"""From the configured source to the workflow's raw files, and coarse inputs for inference.

Training data (`source`: synthetic | era5 | local) become canonical fine-grid `fields` and
`static` datasets over the configured region and period. Other data to downscale with a trained
model (CMIP6 runs, local files; config `inference_inputs`) are read, mapped onto the ERA5 names
the model was trained on, and regridded onto the model's coarse grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from downscaler.variables import short_names


def crop_region(ds: xr.Dataset, region: dict | None, margin: float = 0.0) -> xr.Dataset:
    """Cells whose centres lie inside the region (edges in degrees, lon -180..180)."""
    if region is None:
        return ds
    lat, lon = ds["lat"], ds["lon"]
    inside_lat = (lat >= region["south"] - margin) & (lat <= region["north"] + margin)
    inside_lon = (lon >= region["west"] - margin) & (lon <= region["east"] + margin)
    out = ds.isel(lat=np.flatnonzero(inside_lat.values), lon=np.flatnonzero(inside_lon.values))
    if out.sizes["lat"] == 0 or out.sizes["lon"] == 0:
        raise ValueError(
            f"config key region {region} selects no grid cell of the data "
            f"(lat {float(lat.min()):.2f}..{float(lat.max()):.2f}, "
            f"lon {float(lon.min()):.2f}..{float(lon.max()):.2f})"
        )
    return out


def check_resolution(ds: xr.Dataset, resolution: float, origin: str) -> None:
    """The data's grid spacing must be the configured fine resolution."""
    for name in ("lat", "lon"):
        if ds.sizes[name] > 1:
            step = float(np.diff(ds[name].values).mean())
            if abs(step - resolution) > 1e-6 * max(1.0, resolution):
                raise ValueError(
                    f"{origin}: grid spacing in {name} is {step:g} deg but config key resolution "
                    f"is {resolution:g}; set resolution: {step:g} (or regrid the files)"
                )


def load_training_source(config: dict, raw_dir: Path) -> tuple[xr.Dataset, xr.Dataset]:
    """Canonical (fields, static) for `config['source']` over the region and period."""
    source = config["source"]
    if source == "synthetic":
        from downscaler.sources.synthetic import generate

        return generate(config["variables"], config["region"], config["resolution"],
                        config["period"]["start"], config["period"]["end"],
                        config["frequency"], config["seed"])
    if source == "era5":
        from downscaler.sources.cds import fetch
        from downscaler.sources.era5 import STATIC_TARGET, load_era5, plan_era5_requests

        era5_config = {**config, "era5": {**config["era5"], "grid": config["resolution"]}}
        requests = plan_era5_requests(era5_config)
        paths = fetch(requests, raw_dir, era5_config)
        static_path = Path(raw_dir) / STATIC_TARGET
        data_paths = [p for p in paths if p != static_path]
        fields, static = load_era5(data_paths, static_path, era5_config)
        origin = f"ERA5 files under {raw_dir}"
    elif source == "local":
        from downscaler.sources.local import open_local

        spec = config["local"]
        fields, static = open_local(spec["paths"], config["variables"])
        if spec.get("static_paths"):
            _, static = open_local(spec["static_paths"])
        fields = fields.sel(time=slice(config["period"]["start"],
                                       f"{config['period']['end']}T23:59:59"))
        origin = f"local files {spec['paths']}"
    else:
        raise ValueError(f"config key source: unknown source {source!r}")
    missing = [s for s in ("orog", "lsm") if s not in static]
    if missing:
        raise ValueError(f"{origin}: no static field(s) {missing}; give local.static_paths "
                         "with orography (or geopotential) and land-sea mask")
    fields = crop_region(fields, config["region"])
    static = crop_region(static, config["region"])[["orog", "lsm"]]
    check_resolution(fields, config["resolution"], origin)
    if fields.sizes["time"] == 0:
        raise ValueError(f"{origin}: no time step inside period {config['period']}")
    return fields, static.reindex_like(fields[["lat", "lon"]], method="nearest", tolerance=1e-6)


CDS_MARGIN_DEG = 5.0  # CMIP6 grids reach ~2.8 deg: fetch a border so bilinear covers the edges


def open_inference_input(spec: dict, config: dict, raw_dir: Path | None = None) -> xr.Dataset:
    """Read one `inference_inputs` entry in canonical form (any grid), over its period.

    CMIP6 comes from an ESGF directory tree (`provider: local`), through intake-esgf
    (`esgf`), or from the CDS dataset projections-cmip6 (`cds`, downloaded under `raw_dir`).
    """
    variables = config["variables"]
    period = spec.get("period")
    if spec["source"] == "cmip6":
        from downscaler.sources.cmip6 import find_local_cmip6, open_cmip6, search_esgf

        ids = (spec["source_id"], spec["experiment"], spec["member"], spec["table"])
        if spec["provider"] == "local":
            paths = find_local_cmip6(spec["root"], *ids, variables)
        elif spec["provider"] == "esgf":  # intake-esgf downloads into (and finds files in) root
            paths = search_esgf(*ids, variables, cache=spec.get("root"), period=period)
        else:
            paths = _fetch_cmip6_cds(spec, config, Path(raw_dir or "resources/raw"))
        ds = open_cmip6(paths, variables, period)
    else:
        from downscaler.sources.local import open_local

        ds, _ = open_local(spec["paths"], variables)
        if period:
            ds = ds.sel(time=slice(period["start"], f"{period['end']}T23:59:59"))
    return ds[short_names(variables)]


def _fetch_cmip6_cds(spec: dict, config: dict, raw_dir: Path) -> list[Path]:
    from downscaler.sources.cds import fetch_cmip6_cds

    region = config.get("region")
    if region is not None:
        region = {"south": max(-90.0, region["south"] - CDS_MARGIN_DEG),
                  "north": min(90.0, region["north"] + CDS_MARGIN_DEG),
                  "west": region["west"] - CDS_MARGIN_DEG,
                  "east": region["east"] + CDS_MARGIN_DEG}
    cds_config = {
        **config, "region": region, "frequency": "daily",
        "period": spec.get("period") or config["period"],
        "cmip6": {"model": spec["source_id"], "experiment": spec["experiment"],
                  "member": spec["member"], "variables": config["variables"]},
    }
    return fetch_cmip6_cds(cds_config, raw_dir)


def to_model_grid(ds: xr.Dataset, coarse_grid: xr.Dataset) -> xr.Dataset:
    """Regrid onto the model's coarse grid: conservative from finer data, bilinear from coarser."""
    from downscaler.regrid import regrid

    def spacing(d: xr.Dataset) -> float:
        return float(np.abs(np.diff(d["lat"].values)).mean())

    margin = 2 * max(spacing(ds), spacing(coarse_grid))
    bounds = {"south": float(coarse_grid["lat"].min()), "north": float(coarse_grid["lat"].max()),
              "west": float(coarse_grid["lon"].min()), "east": float(coarse_grid["lon"].max())}
    ds = crop_region(ds, bounds, margin=margin)
    method = "conservative" if spacing(ds) < spacing(coarse_grid) else "bilinear"
    target = xr.Dataset(coords={"lat": coarse_grid["lat"], "lon": coarse_grid["lon"]})
    out = regrid(ds, target, method)
    if bool(out.isnull().any().to_array().any()):
        raise ValueError("the input does not cover the model's whole coarse grid; "
                         "choose data over the region the model was trained on")
    return out
