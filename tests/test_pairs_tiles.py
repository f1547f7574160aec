"""Pairs (nesting, splits, train-only statistics, normalisation) and the zarr tile store."""

import importlib.util
import json

import dask
import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from downscaler.compute import check_scheduler, dask_scheduler
from downscaler.pairs import (
    compute_stats,
    denormalise,
    make_pairs,
    normalise,
    split_by_time,
    write_pairs,
)
from downscaler.tiles_store import TileDataset, is_periodic, window_steps, write_tiles
from downscaler.tiling import stitch

from tests.conftest import random_fields

SPLIT = {
    "train": {"start": "2000-01-01", "end": "2000-01-04"},
    "val": {"start": "2000-01-05", "end": "2000-01-05"},
    "test": {"start": "2000-01-06", "end": "2000-01-06"},
}


def test_pairs_are_exactly_nested_and_carry_statics():
    fields, static = random_fields(n_lat=18, n_lon=26)
    with pytest.raises(ValueError, match=r"regrid.factor: 4 does not divide the 18x26 target"):
        make_pairs(fields, static, factor=4)  # never cropped silently (issue 18 item 3)
    fields, static = random_fields(n_lat=16, n_lon=24)
    fine, coarse = make_pairs(fields, static, factor=4)
    assert (fine.sizes["lat"], fine.sizes["lon"]) == (16, 24)
    assert (coarse.sizes["lat"], coarse.sizes["lon"]) == (4, 6)
    assert set(fine.data_vars) == {"t2m", "tp", "orog", "lsm", "latitude"}
    np.testing.assert_allclose(fine["latitude"].isel(lon=0), fine["lat"])
    np.testing.assert_allclose(coarse["lat"], fine["lat"].values.reshape(4, 4).mean(1))


def test_splits_and_statistics_come_from_train_only():
    fields, static = random_fields()
    fine, _ = make_pairs(fields, static, factor=4)
    parts = split_by_time(fine, SPLIT)
    assert [p.sizes["time"] for p in parts.values()] == [4, 1, 1]
    stats = compute_stats(parts["train"], ["t2m", "tp"])
    np.testing.assert_allclose(stats["t2m"]["mean"], float(parts["train"]["t2m"].mean()), rtol=1e-6)
    tp = parts["train"]["tp"].values.astype("float64")
    logged = np.log1p(np.where(tp > 0.25, tp, 0))
    np.testing.assert_allclose(stats["tp"]["mean"], logged.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="split.test .* selects no time step"):
        split_by_time(fine, {"test": {"start": "2005-01-01", "end": "2005-01-02"}})


def test_normalisation_round_trips_and_clips_drizzle():
    tp = np.array([0.0, 0.1, 0.25, 0.3, 5.0, 80.0])
    entry = {"transform": "log1p", "mean": 0.7, "std": 1.3}
    back = denormalise(normalise(tp, entry), entry)
    np.testing.assert_allclose(back, np.where(tp > 0.25, tp, 0.0), rtol=1e-12)
    assert denormalise(np.array([-50.0]), entry)[0] == 0.0
    t = np.array([250.0, 300.0])
    z = {"transform": "zscore", "mean": 280.0, "std": 10.0}
    np.testing.assert_allclose(normalise(t, z), [-3.0, 2.0])


def test_tile_store_holds_colocated_normalised_pairs(tmp_path):
    fields, static = random_fields(n_lat=32, n_lon=48)
    fine, coarse = make_pairs(fields, static, factor=4)
    stats = compute_stats(fine, ["t2m", "tp", "orog", "lsm", "latitude"])
    cfg = {"div_lat": 2, "div_lon": 3, "halo": 1, "pad_mode": "symmetric"}
    path = tmp_path / "train.zarr"
    write_tiles(fine, coarse, ["t2m", "tp"], ["orog", "lsm", "latitude"], stats, cfg, str(path),
                time_chunk=4)
    data = TileDataset(str(path))
    assert len(data) == 6 * 6
    x, s, y = data[7]  # time 1, tile 1
    assert x.shape == (2, 4 + 2, 4 + 2) and y.shape == (2, 24, 24) and s.shape == (3, 24, 24)
    # stitching the cores of every tile at one time gives back the normalised field
    ys = np.stack([data[6 + n][2].numpy() for n in range(6)], axis=1)
    field = stitch(ys, 2, 3, halo=4)
    np.testing.assert_allclose(field[0], normalise(fine["t2m"].values[1], stats["t2m"]),
                               rtol=1e-5, atol=1e-5)
    assert data.attrs["factor"] == 4 and data.attrs["times"][0].startswith("2000-01-01")
    lazy = TileDataset(str(path), max_in_memory=0)  # reads sample by sample from zarr
    np.testing.assert_array_equal(lazy[7][0].numpy(), x.numpy())


def test_global_grids_are_periodic():
    assert is_periodic(np.arange(0.5, 360, 1.0))
    assert not is_periodic(np.arange(0.5, 30, 1.0))


def with_missing(fields):
    """Land-only style data: NaN over a block of 'sea' cells and a few scattered gaps."""
    fields = fields.copy(deep=True)
    for name in ("t2m", "tp"):
        fields[name].values[:, :8, :8] = np.nan
        fields[name].values[1, 15, 19] = np.nan
    return fields


def test_streaming_statistics_equal_the_in_memory_ones_and_skip_nan():
    fields, _ = random_fields(n_time=12, n_lat=20, n_lon=28)
    fields = with_missing(fields)
    in_memory = compute_stats(fields, ["t2m", "tp"])
    streamed = compute_stats(fields.chunk({"time": 5}), ["t2m", "tp"])
    for name in ("t2m", "tp"):
        for key in ("mean", "std"):
            np.testing.assert_allclose(streamed[name][key], in_memory[name][key], rtol=1e-6)
    t2m = fields["t2m"].values.astype("float64")
    np.testing.assert_allclose(in_memory["t2m"]["mean"], np.nanmean(t2m), rtol=1e-8)
    np.testing.assert_allclose(in_memory["t2m"]["std"], np.nanstd(t2m), rtol=1e-6)
    tp = fields["tp"].values.astype("float64")
    logged = np.log1p(np.where(tp <= 0.25, 0.0, tp))  # NaN stays NaN, not "dry"
    np.testing.assert_allclose(in_memory["tp"]["mean"], np.nanmean(logged), rtol=1e-6)
    assert np.isnan(normalise(np.array([np.nan]), in_memory["tp"]))[0]
    with pytest.raises(ValueError, match="'t2m' has no valid value"):
        compute_stats(fields.isel(lat=slice(0, 8), lon=slice(0, 8)), ["t2m"])


def test_pairs_keep_missing_data_missing_by_the_threshold():
    fields, static = random_fields(n_time=3, n_lat=16, n_lon=24)
    fields["t2m"].values[:, 0, :3] = np.nan  # 3 of the 16 cells of coarse cell (0, 0) missing
    fields["t2m"].values[:, 4:8, 4:8] = np.nan  # coarse cell (1, 1) fully missing
    fields["t2m"].values[:, 8:12, 8:10] = np.nan  # coarse cell (2, 2): half its area missing
    _, coarse = make_pairs(fields, static, factor=4, nan_threshold=0.6)
    t2m = coarse["t2m"].values
    assert np.isfinite(t2m[:, 0, 0]).all() and np.isnan(t2m[:, 1, 1]).all()
    assert np.isnan(t2m[:, 2, 2]).all()  # about 0.5 valid < 0.6
    assert np.isfinite(np.delete(t2m.reshape(3, -1), [7, 14], axis=1)).all()
    np.testing.assert_allclose(t2m[0, 0, 0], np.nanmean(fields["t2m"].values[0, :4, :4]),
                               rtol=1e-3)  # nearly equal areas within one 1 deg row
    _, lenient = make_pairs(fields, static, factor=4, nan_threshold=0.4)
    assert np.isfinite(lenient["t2m"].values[:, 2, 2]).all()


def test_tile_store_keeps_missing_targets_nan_with_a_mask(tmp_path):
    fields, static = random_fields(n_time=4, n_lat=32, n_lon=48)
    fields = with_missing(fields)
    fine, coarse = make_pairs(fields, static, factor=4)
    stats = compute_stats(fine, ["t2m", "tp", "orog", "lsm", "latitude"])
    cfg = {"div_lat": 2, "div_lon": 3, "halo": 1, "pad_mode": "symmetric"}
    path = tmp_path / "train.zarr"
    write_tiles(fine, coarse, ["t2m", "tp"], ["orog", "lsm", "latitude"], stats, cfg, str(path))
    data = TileDataset(str(path), max_in_memory=0, return_mask=True)
    x, _, y, mask = data[0]  # time 0, tile 0 (south-west corner: the missing block)
    assert mask.dtype == torch.bool and mask.shape == y.shape
    np.testing.assert_array_equal(mask.numpy(), np.isfinite(y.numpy()))
    assert not bool(mask[:, 4:12, 4:12].any())  # fine cells [0, 8) behind a 4-pixel halo
    assert bool(mask[:, 12:, 12:].all())
    assert torch.isfinite(x).all()  # missing coarse inputs are filled with 0 (the mean)
    assert (x[:, 1:3, 1:3] == 0).all()  # coarse cells (0..1, 0..1) behind a 1-pixel halo
    n_missing = 2 * (4 * 8 * 8 + 1)  # both variables: the block at every time + 1 gap
    ys = np.stack([data[t * 6 + n][2].numpy() for t in range(4) for n in range(6)])
    masks = np.stack([data[t * 6 + n][3].numpy() for t in range(4) for n in range(6)])
    assert np.isnan(ys).sum() == (~masks).sum()
    cores = [stitch(ys.reshape(4, 6, 2, 24, 24)[t].swapaxes(0, 1), 2, 3, halo=4)
             for t in range(4)]
    assert int(np.isnan(np.stack(cores)).sum()) == n_missing
    assert data.attrs["filled_inputs"] > 0 and data.attrs["missing_targets"] >= n_missing
    x3, s3, y3 = TileDataset(str(path))[0]  # default: the (x, static, y) triple as before
    np.testing.assert_array_equal(x3.numpy(), x.numpy())


def test_tile_windows_are_memory_bounded_and_give_the_same_store(tmp_path):
    fields, static = random_fields(n_time=6, n_lat=32, n_lon=48)
    fine, coarse = make_pairs(fields, static, factor=4)
    stats = compute_stats(fine, ["t2m", "tp", "orog", "lsm", "latitude"])
    cfg = {"div_lat": 2, "div_lon": 3, "halo": 1, "pad_mode": "edge"}
    args = (["t2m", "tp"], ["orog", "lsm", "latitude"], stats, cfg)
    write_tiles(fine, coarse, *args, str(tmp_path / "big.zarr"))
    write_tiles(fine, coarse, *args, str(tmp_path / "small.zarr"), memory_mb=0.01)
    big, small = (zarr.open_group(str(tmp_path / n), mode="r") for n in ("big.zarr", "small.zarr"))
    assert big["y"].shards[0] == 6 and small["y"].shards[0] == 1  # one step per window
    assert window_steps(10 * 2**20, memory_mb=120, time_chunk=64) == 2
    for name in ("x", "y"):
        np.testing.assert_array_equal(big[name][...], small[name][...])
    # no missing data: the mask holds only its fill value, so none of its chunks is on disk
    assert not any((tmp_path / "big.zarr" / "mask").glob("c/**/*.*")) and not any(
        p.is_file() for p in (tmp_path / "big.zarr" / "mask").rglob("*") if p.name != "zarr.json")


def test_write_pairs_streams_all_outputs(tmp_path):
    fields, static = random_fields(n_time=6, n_lat=16, n_lon=24)
    regrid_cfg = {"factor": 4, "backend": "auto", "nan_threshold": 0.5,
                  "scheduler": "synchronous"}
    paths = [str(tmp_path / n) for n in ("fine.nc", "coarse.nc", "stats.json")]
    names = ["t2m", "tp", "orog", "lsm", "latitude"]
    roles = {"inputs": ["t2m", "tp"], "targets": ["t2m", "tp"], "calendar": [],
             "statics": ["orog", "lsm", "latitude"]}
    stats = write_pairs(fields.chunk({"time": 2}), static, regrid_cfg, SPLIT, roles, *paths)
    fine, coarse = make_pairs(fields, static, factor=4)
    expected = compute_stats(split_by_time(fine, SPLIT)["train"], names)
    for name in names:
        assert stats[name]["transform"] == expected[name]["transform"]
        for key in ("mean", "std"):
            assert stats[name][key] == pytest.approx(expected[name][key], rel=1e-7)
    with xr.open_dataset(paths[1]) as on_disk:
        xr.testing.assert_allclose(on_disk.load(), coarse)
    with pytest.raises(ValueError, match="regrid.scheduler must be one of"):
        write_pairs(fields, static, {**regrid_cfg, "scheduler": "mpi"}, SPLIT, roles, *paths)


def test_scheduler_selection():
    assert check_scheduler("threads") == "local"
    assert check_scheduler("tcp://10.0.0.1:8786") == "distributed"
    with dask_scheduler("synchronous", progress=False):
        assert dask.config.get("scheduler") == "synchronous"
    if importlib.util.find_spec("distributed") is None:
        with pytest.raises(ImportError, match="needs dask.distributed: pip install"):
            with dask_scheduler("tcp://127.0.0.1:1"):
                pass


def test_inputs_from_another_dataset_many_to_few_with_calendar(tmp_path):
    """Separate inputs: fine-grid inputs (other variables than the targets) are block-averaged
    exactly like coarsened targets; inputs on a 1-degree grid offset from the coarse grid are
    regridded conservatively; calendar features are in coarse.nc; stats.json names the roles;
    the tiles hold the inputs in x and the targets in y."""
    from downscaler.pairs import calendar_features
    from downscaler.regrid import coarsen_conservative

    fields, static = random_fields(n_time=6, n_lat=16, n_lon=24)
    rng = np.random.default_rng(1)
    wind = fields[["t2m"]].rename(t2m="u10").copy(
        data={"u10": rng.normal(0, 5, fields["t2m"].shape).astype("f4")})
    fine, coarse = make_pairs(fields[["t2m"]], static, 4, inputs=wind, input_names=["u10"])
    np.testing.assert_allclose(coarse["u10"], coarsen_conservative(wind, 4)["u10"], rtol=1e-6)
    assert "t2m" not in coarse and "u10" not in fine and "orog" in coarse

    # inputs on their own 1-degree grid, half a degree off the coarse cells, larger domain
    lat, lon = np.arange(29.0, 36.0, 1.0), np.arange(-9.0, 0.0, 1.0)
    z = xr.Dataset({"z500": (("time", "lat", "lon"),
                             np.broadcast_to(5.5e4 + 10 * lat[:, None], (6, 7, 9)).astype("f4"))},
                   coords={"time": fields["time"], "lat": lat, "lon": lon})
    _, coarse = make_pairs(fields[["t2m"]], static, 4, inputs=z, calendar=["doy_sin", "doy_cos"])
    # a field linear in latitude keeps its value at the coarse cell centres
    np.testing.assert_allclose(coarse["z500"].isel(time=0, lon=0),
                               5.5e4 + 10 * coarse["lat"].values, rtol=1e-6)
    expected = calendar_features(fields["time"].values, ["doy_sin"], coarse)["doy_sin"]
    np.testing.assert_allclose(coarse["doy_sin"], expected)
    assert float(coarse["doy_sin"].isel(time=0, lat=0, lon=0)) == pytest.approx(0.0, abs=1e-6)

    roles = {"inputs": ["z500", "doy_sin", "doy_cos"], "targets": ["t2m"],
             "calendar": ["doy_sin", "doy_cos"], "statics": ["orog", "latitude"]}
    paths = [str(tmp_path / n) for n in ("fine.nc", "coarse.nc", "stats.json")]
    regrid_cfg = {"factor": 4, "scheduler": "synchronous"}
    write_pairs(fields, static, regrid_cfg, SPLIT, roles, *paths, inputs=z)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["inputs"] == roles["inputs"] and stats["targets"] == ["t2m"]
    assert set(stats) >= {"z500", "doy_sin", "t2m", "orog", "latitude"} and "lsm" not in stats
    with xr.open_dataset(paths[0]) as f, xr.open_dataset(paths[1]) as c:
        write_tiles(f, c, ["t2m"], ["orog", "latitude"], stats,
                    {"div_lat": 1, "div_lon": 2, "halo": 1, "pad_mode": "symmetric"},
                    str(tmp_path / "t.zarr"), inputs=roles["inputs"])
    x, s, y = TileDataset(str(tmp_path / "t.zarr"))[0]
    assert x.shape == (3, 6, 5) and s.shape == (2, 24, 20) and y.shape == (1, 24, 20)
