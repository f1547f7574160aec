"""The catalogue of bad inputs and faults (issue 18): each case asserts its exact outcome.

Config cases stop in `validate_config` with one message naming the key and the fix; file cases
stop while reading (the source stage) naming the file, the variable and what to do; CDS faults
run the real cdsapi client against tests/fake_cds.py. Cases that must *work* (no statics, a
static that is not requested) assert the correct result instead. The README section "What
happens when things go wrong" lists the same catalogue.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from downscaler.config import ConfigError, validate_config
from fake_cds import fake_cds  # noqa: F401 (fixture)

REGION = {"south": 34.0, "north": 42.0, "west": 0.0, "east": 8.0}
PERIOD = {"start": "2000-01-01", "end": "2000-01-06"}
SPLIT = {"train": {"start": "2000-01-01", "end": "2000-01-04"},
         "val": {"start": "2000-01-05", "end": "2000-01-05"},
         "test": {"start": "2000-01-06", "end": "2000-01-06"}}


def base_config(**changes) -> dict:
    """A valid local-files config over REGION (16 x 16 cells of 0.5 deg -> 4 x 4 coarse)."""
    config = {"targets": {"source": "local", "variables": ["2m_temperature"],
                          "resolution": 0.5, "paths": ["targets.nc"]},
              "inputs": {"source": "coarsened"}, "statics": ["latitude"],
              "region": REGION, "period": PERIOD, "split": SPLIT,
              "regrid": {"factor": 4}, "tiles": {"div_lat": 1, "div_lon": 1, "halo": 0}}
    for key, value in changes.items():
        config[key] = value
    return config


def write_targets(path, south=34.0, north=42.0, days=6, celsius=False, units="K"):
    lat = np.arange(south + 0.25, north, 0.5)
    lon = np.arange(0.25, 8.0, 0.5)
    time = pd.date_range("2000-01-01", periods=days)
    values = 280.0 + np.random.default_rng(0).normal(size=(days, lat.size, lon.size))
    if celsius:
        values = values - 273.15
    xr.Dataset({"t2m": (("time", "lat", "lon"), values.astype("f4"), {"units": units})},
               coords={"time": time, "lat": lat, "lon": lon}).to_netcdf(path)
    return str(path)


def load(config, tmp_path):
    from downscaler.sources.prepare import load_targets

    return load_targets(validate_config(config), tmp_path / "raw")


# ------------------------------------------------------------------------------ config cases

CONFIG_CASES = {
    "magnification that does not divide the grid (18.3)": (
        lambda c: c["regrid"].update(factor=3),
        "config key regrid.factor: 3 does not divide the 16x16 target grid (region {'south': "
        "34.0, 'north': 42.0, 'west': 0.0, 'east': 8.0}, targets.resolution 0.5); the coarse "
        "grid would drop cells. Choose regrid.factor in [2, 4, 8], or a region whose extent is a "
        "multiple of 1.5 deg, e.g. north 41.5 or 43, east 7.5 or 9"),
    "halo larger than the tile (18.11)": (
        lambda c: c.update(tiles={"div_lat": 2, "div_lon": 2, "halo": 40}),
        "config key tiles.halo: 40 coarse pixels is wider than the 2x2 tiles; each tile would "
        "carry 1681.0x the tokens of its core (halo 2 costs 9.0x). Use a halo of at most 2 "
        "(ORBIT-2 uses a few pixels), or fewer tiles (smaller div_lat/div_lon)"),
    "typo in train.variable_weights (18.5)": (
        lambda c: c.update(train={"variable_weights": {"2m_temperatur": 10.0}}),
        "config key train.variable_weights: ['2m_temperatur'] are not target variables; valid "
        "names: ['2m_temperature']"),
    "unknown target variable": (
        lambda c: c["targets"].update(variables=["2m_temp"]),
        "config key targets.variables.0: unknown variable '2m_temp'; valid choices: "
        "['10m_u_component_of_wind', '10m_v_component_of_wind', '2m_temperature', "
        "'maximum_2m_temperature_since_previous_post_processing', "
        "'minimum_2m_temperature_since_previous_post_processing', 'total_precipitation', "
        "'land_sea_mask', 'latitude', 'orography', 'geopotential@<hPa>', "
        "'relative_humidity@<hPa>', 'specific_humidity@<hPa>', 'temperature@<hPa>', "
        "'u_component_of_wind@<hPa>', 'v_component_of_wind@<hPa>', 'vertical_velocity@<hPa>']"),
    "coarsened inputs that are not targets": (
        lambda c: c["inputs"].update(variables=["geopotential@500"]),
        "config key inputs.variables: ['geopotential@500'] are not target variables, so source "
        "coarsened cannot make them; add them to targets.variables or choose another "
        "inputs.source (synthetic, era5, local)"),
    "local inputs without files": (
        lambda c: c.update(inputs={"source": "local"}),
        "config key inputs.paths: source local needs files or glob patterns"),
    "old flat keys mixed with the new blocks": (
        lambda c: c.update(source="local"),
        "config keys ['source'] are the old flat form and cannot be mixed with targets/inputs: "
        "move them (source -> targets.source); e.g. targets: {source: local, variables: "
        "[2m_temperature], resolution: 0.25, paths: [...]}, inputs: {source: coarsened} "
        "(README, 'Bring your own data')"),
    "old era5 pressure-level keys": (
        lambda c: c.update(era5={"pressure_levels": [850], "pressure_level_variables": ["t"]}),
        "config keys era5.pressure_level_variables / era5.pressure_levels are no longer used: "
        "name each pressure-level variable in inputs.variables (or targets.variables) as "
        "name@hPa, e.g. [temperature@850, geopotential@500]"),
    "inputs finer than the targets": (
        lambda c: c.update(inputs={"source": "local", "paths": ["x.nc"], "resolution": 0.1}),
        "config key inputs.resolution: 0.1 deg is finer than targets.resolution 0.5; there is "
        "nothing to downscale. Inputs must be coarser than the targets (the model's coarse grid "
        "is targets.resolution x regrid.factor)"),
    "region not a multiple of the resolution": (
        lambda c: c["targets"].update(resolution=0.3),
        "config key region: extent 8.0 deg is not a multiple of targets.resolution 0.3"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_case_stops_with_its_message(case):
    change, message = CONFIG_CASES[case]
    config = base_config()
    change(config)
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert str(err.value) == message


# ------------------------------------------------------------------------------- file cases


def test_partial_coverage_is_an_error_or_with_coverage_warn_a_warning(tmp_path):
    """18.2: a file over 34-38N when 34-42N is configured is never silently cropped."""
    path = write_targets(tmp_path / "t.nc", north=38.0)
    config = base_config()
    config["targets"]["paths"] = [path]
    origin = f"local files ['{path}'] (targets)"
    with pytest.raises(ValueError) as err:
        load(config, tmp_path)
    assert str(err.value) == (
        f"{origin}: lat 34..38 does not cover region south 34 .. north 42. Fetch the missing "
        "data, shrink region/period to the data, or set coverage: warn to proceed on what "
        "there is")
    config["coverage"] = "warn"
    with pytest.warns(UserWarning, match=re.escape("coverage: warn, proceeding")):
        fields, _ = load(config, tmp_path)
    assert fields.sizes["lat"] == 8


def test_missing_time_steps_are_named(tmp_path):
    path = write_targets(tmp_path / "t.nc", days=4)
    config = base_config()
    config["targets"]["paths"] = [path]
    with pytest.raises(ValueError) as err:
        load(config, tmp_path)
    assert str(err.value).endswith(
        "2 of 6 time steps of period 2000-01-01..2000-01-06 are missing (first 2000-01-05 "
        "00:00, last 2000-01-06 00:00). Fetch the missing data, shrink region/period to the "
        "data, or set coverage: warn to proceed on what there is")


def test_celsius_labelled_kelvin_is_implausible(tmp_path):
    """18.4: values outside the plausible range name the file, variable, count and a value."""
    path = write_targets(tmp_path / "t.nc", celsius=True)
    config = base_config()
    config["targets"]["paths"] = [path]
    with pytest.raises(ValueError) as err:
        load(config, tmp_path)
    with xr.open_dataset(path) as ds:
        example = float(ds["t2m"].min())
    assert str(err.value) == (
        f"file {path}: variable t2m has 1536 value(s) outside the plausible range 150..350 K "
        f"(e.g. {example:g}); check the file's units attribute (e.g. Celsius labelled K) and "
        "its contents")


def test_truncated_local_netcdf_is_named_damaged(tmp_path):
    """18.7: not 'OSError: [Errno -101] NetCDF: HDF error' but which file and what to do."""
    good = tmp_path / "good.nc"
    write_targets(good)
    data = good.read_bytes()  # netCDF-4 (HDF5), as the CDS and most products ship
    assert data.startswith(b"\x89HDF")
    cut = tmp_path / "t.nc"
    cut.write_bytes(data[: len(data) // 2])
    config = base_config()
    config["targets"]["paths"] = [str(cut)]
    with pytest.raises(ValueError) as err:
        load(config, tmp_path)
    assert str(err.value).startswith(f"{cut} is damaged or incomplete (truncated download or "
                                     "copy?): it cannot be read (")
    assert str(err.value).endswith("); download or copy it again")


def test_requested_static_that_cannot_be_found(tmp_path):
    """16 §2: one message naming the key and where it was looked for."""
    path = write_targets(tmp_path / "t.nc")
    config = base_config(statics=["orography", "latitude"])
    config["targets"]["paths"] = [path]
    with pytest.raises(ValueError) as err:
        load(config, tmp_path)
    assert str(err.value) == (
        f"config key statics: ['orography'] requested but not found in the targets' source "
        f"(local files ['{path}'] (targets)) (looked for orog, z (surface geopotential), "
        "orography); give static_paths with it, or remove it from statics")


@pytest.mark.parametrize("statics", [[], ["latitude"]])
def test_statics_not_requested_are_never_demanded(tmp_path, statics):
    """16 §2 / 18.8: no statics, or latitude only, from files without any static field."""
    path = write_targets(tmp_path / "t.nc")
    config = base_config(statics=statics)
    config["targets"]["paths"] = [path]
    fields, static = load(config, tmp_path)
    assert list(static.data_vars) == [] and fields.sizes["lat"] == 16


def test_no_statics_tiles_and_train_shapes(tmp_path):
    """18.8: `statics: []` goes through pairs and tiles (the IndexError is gone)."""
    from downscaler import cli

    path = write_targets(tmp_path / "t.nc")
    config = validate_config(base_config(statics=[]))
    config["targets"]["paths"] = [path]
    out = tmp_path
    steps = [["source", "--raw-dir", str(out / "raw"), "--fields", f"{out}/f.nc", "--static",
              f"{out}/s.nc"],
             ["pairs", "--fields", f"{out}/f.nc", "--inputs", "none", "--static", f"{out}/s.nc",
              "--fine", f"{out}/fine.nc", "--coarse", f"{out}/coarse.nc", "--stats",
              f"{out}/stats.json"],
             ["tiles", "--fine", f"{out}/fine.nc", "--coarse", f"{out}/coarse.nc", "--stats",
              f"{out}/stats.json", "--split", "train", "--out", f"{out}/train.zarr"]]
    for args in steps:
        assert cli.main([args[0], "--config", json.dumps(config), *args[1:]]) == 0
    from downscaler.tiles_store import TileDataset

    x, static, y = TileDataset(str(out / "train.zarr"))[0]
    assert static.shape == (0, 16, 16) and x.shape == (1, 4, 4) and y.shape == (1, 16, 16)


# ------------------------------------------------------------------------------- CDS faults


def test_cds_damaged_answer_is_retried_then_called_damaged(fake_cds, tmp_path):  # noqa: F811
    """18.6: a cut answer whose advertised size matches is retried, then called damaged."""
    from downscaler.sources.cds import CDSError, fetch
    from downscaler.sources.era5 import plan_era5_requests

    fake_cds.scenario.damaged = 100
    cfg = {"variables": ["2m_temperature"], "region": REGION, "frequency": "daily",
           "period": {"start": "2000-01-01", "end": "2000-01-01"},
           "era5": {"grid": 0.5, "retries": 1, "retry_wait_s": 0.01}}
    req = plan_era5_requests(cfg, invariants=False)[0]
    with pytest.raises(CDSError) as err:
        fetch([req], tmp_path, cfg, progress=False)
    message = str(err.value)
    assert message.startswith(f"Giving up on {req.summary} after 2 attempts: every answer was "
                              "a damaged download (damaged download: the netcdf answer cannot "
                              "be read (unreadable (")
    assert message.endswith("nothing was kept. The CDS may be serving a broken file: re-run "
                            "later (completed files are kept and skipped) or report it to the "
                            "CDS.")


def test_old_flat_config_still_works_with_a_warning():
    old = {"source": "synthetic", "variables": ["2m_temperature"], "resolution": 0.5,
           "region": REGION, "period": PERIOD, "split": SPLIT, "regrid": {"factor": 4},
           "tiles": {"div_lat": 1, "div_lon": 1, "halo": 0}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = validate_config(copy.deepcopy(old))
    assert config["targets"]["source"] == "synthetic" and config["inputs"]["source"] == "coarsened"
    assert any("deprecated: use source -> targets.source" in str(w.message) for w in caught)


def test_grid_points_on_the_region_edges_give_the_configured_grid(tmp_path):
    """ERA5-style points on the region's edges (34.0 ... 42.0) are cropped half-open to the
    16 rows the config implies, never to 17 (which no factor would divide), and statics on a
    larger domain of the same grid are taken as they are (no regridding)."""
    lat, lon = np.arange(34.0, 42.01, 0.5), np.arange(0.0, 8.01, 0.5)
    time = pd.date_range("2000-01-01", periods=6)
    values = np.full((6, lat.size, lon.size), 280.0, dtype="f4")
    xr.Dataset({"t2m": (("time", "lat", "lon"), values, {"units": "K"})},
               coords={"time": time, "lat": lat, "lon": lon}).to_netcdf(tmp_path / "t.nc")
    big_lat, big_lon = np.arange(30.0, 46.01, 0.5), np.arange(-4.0, 12.01, 0.5)
    orog = np.add.outer(big_lat, big_lon).astype("f4")
    xr.Dataset({"orog": (("lat", "lon"), orog, {"units": "m"})},
               coords={"lat": big_lat, "lon": big_lon}).to_netcdf(tmp_path / "orog.nc")
    config = base_config(statics=["orography"], static_paths=[str(tmp_path / "orog.nc")])
    config["targets"]["paths"] = [str(tmp_path / "t.nc")]
    fields, static = load(config, tmp_path)
    assert fields.sizes["lat"] == 16 and fields.sizes["lon"] == 16
    assert float(fields["lat"][0]) == 34.0 and float(fields["lat"][-1]) == 41.5
    np.testing.assert_array_equal(static["orog"], np.add.outer(lat[:-1], lon[:-1]))


def test_daily_files_stamped_at_noon_meet_the_period(tmp_path):
    """Daily products often stamp 12:00: they are daily steps of the period, not missing ones;
    sub-daily steps under frequency daily are named."""
    path = write_targets(tmp_path / "t.nc")
    with xr.open_dataset(path) as ds:
        noon = ds.load().assign_coords(time=ds["time"] + np.timedelta64(12, "h"))
    noon.to_netcdf(tmp_path / "noon.nc")
    config = base_config()
    config["targets"]["paths"] = [str(tmp_path / "noon.nc")]
    fields, _ = load(config, tmp_path)
    assert list(fields.indexes["time"].hour) == [0] * 6
    twice = xr.concat([noon, noon.assign_coords(time=noon["time"] + np.timedelta64(6, "h"))],
                      "time").sortby("time")
    twice.to_netcdf(tmp_path / "twice.nc")
    config["targets"]["paths"] = [str(tmp_path / "twice.nc")]
    with pytest.raises(ValueError, match="several time steps per day, but config key frequency "
                                         "is daily"):
        load(config, tmp_path)
