"""The whole workflow, end to end, through Snakemake on tiny data; lint; every source."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from tests.conftest import REPO
from tests.fake_cds import fake_cds  # noqa: F401  (fixture)

BIN = Path(sys.executable).parent

TINY = {
    "seed": 3,
    "targets": {"source": "synthetic", "resolution": 0.5},  # 16 x 32 fine cells
    "inputs": {"source": "coarsened"},  # -> 4 x 8 coarse cells
    "region": {"south": 40.0, "north": 48.0, "west": 0.0, "east": 16.0},
    "period": {"start": "2000-01-01", "end": "2000-02-29"},
    "split": {
        "train": {"start": "2000-01-01", "end": "2000-02-09"},
        "val": {"start": "2000-02-10", "end": "2000-02-19"},
        "test": {"start": "2000-02-20", "end": "2000-02-29"},
    },
    "regrid": {"factor": 4},
    "tiles": {"div_lat": 1, "div_lon": 2, "halo": 1},
    "train": {"epochs": 2, "batch_size": 16},
}


def run_snakemake(workdir: Path, config: dict, *args: str, check: bool = True):
    """Run the repository's Snakefile in `workdir` with `config`, as a user would."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}"
                         for p in sorted((workdir / "logs").rglob("*.log")))
        pytest.fail(f"snakemake failed:\n{result.stderr[-4000:]}\n{logs}")
    return result


def check_outputs(workdir: Path) -> pd.DataFrame:
    """Every final output exists; numbers are finite; the downscaled file is CF netCDF."""
    results = workdir / "results"
    for path in ["model/checkpoint.pt", "model/training_log.csv", "downscaled/test.nc",
                 "evaluation/table.md", "evaluation/figures/maps_t2m.png",
                 "evaluation/figures/training_curves.png"]:
        assert (results / path).stat().st_size > 0, path
    metrics = pd.read_csv(results / "evaluation/metrics.csv")
    assert list(metrics.columns) == ["method", "variable", "metric", "value"]
    assert {"reslim", "bicubic", "bilinear", "nearest"} <= set(metrics["method"])
    assert {"rmse", "bias", "pearson_r"} <= set(metrics["metric"])
    core = metrics[metrics["metric"].isin(["rmse", "bias", "pearson_r"])]
    assert np.isfinite(core["value"]).all()
    with xr.open_dataset(results / "downscaled/test.nc") as ds:
        assert ds["t2m"].attrs["units"] == "K" and ds.attrs["Conventions"].startswith("CF")
        assert np.isfinite(ds["t2m"]).all() and float(ds["tp"].min()) >= 0
    return metrics


def write_cmip6_tree(root: Path) -> None:
    """tas and pr of a fictitious model in the ESGF layout: 2 deg grid, noleap, 0..360 lon."""
    import cftime
    from downscaler.sources.cmip6 import esgf_path

    times = [cftime.DatetimeNoLeap(2000, 2, d, 12) for d in range(15, 29)]
    lat, lon = np.arange(31.0, 58.0, 2.0), np.arange(0.0, 360.0, 2.0)
    wave = np.cos(np.deg2rad(lat))[:, None] * np.ones(lon.size)
    for var, units, values in (("tas", "K", 270 + 10 * wave), ("pr", "kg m-2 s-1", 3e-5 * wave)):
        data = np.repeat(values[None], len(times), axis=0).astype("float32")
        ds = xr.Dataset({var: (("time", "lat", "lon"), data, {"units": units})},
                        coords={"time": times, "lat": lat, "lon": lon})
        ds["time"].encoding.update(units="days since 1850-01-01", calendar="noleap")
        path = esgf_path(root, "CMIP", "INST", "FAKE-ESM", "historical", "r1i1p1f1", "day", var,
                         "gn", "v20200101", time_range="20000215-20000228")
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.to_netcdf(path)


@pytest.mark.slow
def test_demo_workflow_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    write_cmip6_tree(tmp_path / "CMIP6")
    config = {**TINY, "inference_inputs": {"cmip6_hist": {
        "source": "cmip6", "provider": "local", "root": str(tmp_path / "CMIP6"),
        "source_id": "FAKE-ESM", "experiment": "historical",
        "period": {"start": "2000-02-20", "end": "2000-02-29"}}}}
    run_snakemake(workdir, config)
    check_outputs(workdir)
    with xr.open_dataset(workdir / "results/downscaled/cmip6_hist.nc") as ds:
        assert ds.sizes == {"time": 9, "lat": 16, "lon": 32}  # noleap: no 29 February
        assert np.isfinite(ds["t2m"]).all() and float(ds["tp"].min()) >= 0
        assert 250 < float(ds["t2m"].mean()) < 290
    # A second run has nothing to do: outputs are complete and up to date.
    again = run_snakemake(workdir, config, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_bad_config_stops_before_any_rule(tmp_path):
    bad = copy.deepcopy(TINY)
    bad["train"]["epochs"] = 0
    result = run_snakemake(tmp_path, bad, "-n", check=False)
    assert result.returncode != 0
    assert "config key train.epochs: 0 is less than the minimum of 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_workflow_is_lint_and_format_clean():
    lint = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert "Congratulations" in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    fmt = subprocess.run([str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert fmt.returncode == 0, fmt.stderr


@pytest.mark.slow
def test_era5_source_end_to_end_against_fake_cds(tmp_path, fake_cds):  # noqa: F811
    config = copy.deepcopy(TINY)
    config.update(
        targets={"source": "era5", "resolution": 1.0},  # ERA5 points 40..48 x 0..16 -> 8 x 16
        period={"start": "2000-01-01", "end": "2000-01-21"},
        split={"train": {"start": "2000-01-01", "end": "2000-01-14"},
               "val": {"start": "2000-01-15", "end": "2000-01-17"},
               "test": {"start": "2000-01-18", "end": "2000-01-21"}},
        regrid={"factor": 2},
        era5={"retries": 1, "retry_wait_s": 0.01, "max_parallel_requests": 2},
    )
    config["train"]["epochs"] = 1
    workdir = tmp_path / "run"
    run_snakemake(workdir, config)
    check_outputs(workdir)
    submitted = fake_cds.count("POST", "/execution")
    assert submitted >= 3  # instantaneous + accumulated variables + invariants
    raw = workdir / "resources/raw/era5"
    assert any(raw.rglob("*.nc"))
    # Forcing the source step again re-uses every complete download: nothing is re-requested.
    run_snakemake(workdir, config, "--forcerun", "source", "--until", "source")
    assert fake_cds.count("POST", "/execution") == submitted


def test_local_source_reads_cds_style_files(tmp_path):
    from downscaler.config import validate_config
    from downscaler.sources.prepare import load_targets
    from downscaler.sources.synthetic import generate

    region = {"south": 40.0, "north": 44.0, "west": 0.0, "east": 4.0}
    fields, static = generate(["2m_temperature", "total_precipitation"], region, 0.5,
                              "2000-01-01", "2000-01-05")
    # Write them the way the new CDS does: valid_time, descending latitude, 0..360 longitude,
    # precipitation in metres (hourly accumulation).
    cds = fields.rename(time="valid_time", lat="latitude", lon="longitude")
    cds = cds.isel(latitude=slice(None, None, -1))
    cds["tp"] = (cds["tp"] / 24000.0).assign_attrs(units="m")
    cds = cds.assign_coords(longitude=cds["longitude"] % 360)
    cds.to_netcdf(tmp_path / "fields.nc")
    static.to_netcdf(tmp_path / "static.nc")
    period = {"start": "2000-01-02", "end": "2000-01-04"}
    config = validate_config({
        "targets": {"source": "local", "variables": ["2m_temperature", "total_precipitation"],
                    "resolution": 0.5, "paths": [str(tmp_path / "fields.nc")]},
        "static_paths": [str(tmp_path / "static.nc")], "statics": ["orography"],
        "region": region, "period": period, "regrid": {"factor": 2},
        "split": {name: {"start": f"2000-01-0{d}", "end": f"2000-01-0{d}"}
                  for name, d in (("train", 2), ("val", 3), ("test", 4))},
        "tiles": {"div_lat": 1, "div_lon": 1, "halo": 0}})
    got, got_static = load_targets(config, tmp_path / "raw")
    assert got.sizes == {"time": 3, "lat": 8, "lon": 8}
    np.testing.assert_allclose(got["t2m"], fields["t2m"].isel(time=slice(1, 4)), rtol=1e-6)
    np.testing.assert_allclose(got["tp"], fields["tp"].isel(time=slice(1, 4)), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(got_static["orog"], static["orog"])
    assert list(got_static.data_vars) == ["orog"]  # only the statics asked for
    config["targets"]["resolution"] = 0.25
    with pytest.raises(ValueError, match="set targets.resolution: 0.5"):
        load_targets(config, tmp_path / "raw")


def test_cmip6_from_the_cds_through_the_real_client(tmp_path, fake_cds):  # noqa: F811
    from downscaler.sources.prepare import open_inference_input

    spec = {"source": "cmip6", "provider": "cds", "source_id": "MPI-ESM1-2-LR",
            "experiment": "ssp245", "member": "r1i1p1f1", "table": "day",
            "period": {"start": "2050-01-01", "end": "2050-01-31"}}
    config = {"inputs": {"variables": ["2m_temperature"]}, "region": TINY["region"],
              "period": spec["period"], "era5": {"retries": 1, "retry_wait_s": 0.01}}
    ds = open_inference_input(spec, config, tmp_path / "raw")
    assert list(ds.data_vars) == ["t2m"] and ds.sizes["time"] == 31
    assert ds["t2m"].attrs["units"] == "K"
    dataset, request = fake_cds.submitted[-1]
    assert dataset == "projections-cmip6"
    assert request["experiment"] == "ssp2_4_5" and request["model"] == "mpi_esm1_2_lr"
    assert request["area"] == [53.0, -5.0, 35.0, 21.0]  # the region plus a 5 degree border
