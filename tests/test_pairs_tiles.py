"""Pairs (nesting, splits, train-only statistics, normalisation) and the zarr tile store."""

import numpy as np
import pytest
from downscaler.pairs import (
    compute_stats,
    denormalise,
    make_pairs,
    normalise,
    split_by_time,
)
from downscaler.tiles_store import TileDataset, is_periodic, write_tiles
from downscaler.tiling import stitch

from tests.conftest import random_fields

SPLIT = {
    "train": {"start": "2000-01-01", "end": "2000-01-04"},
    "val": {"start": "2000-01-05", "end": "2000-01-05"},
    "test": {"start": "2000-01-06", "end": "2000-01-06"},
}


def test_pairs_are_exactly_nested_and_carry_statics():
    fields, static = random_fields(n_lat=18, n_lon=26)
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
