"""Inference: tiling is exact where it should be, output streams chunk by chunk, files carry
their metadata, several processes give the same file as one."""

from __future__ import annotations

import json

import netCDF4
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from downscaler import infer as I
from downscaler.checkpoint import file_sha256, save_checkpoint
from downscaler.model.presets import build_model
from downscaler.pairs import compute_stats, denormalise
from downscaler.tiles_store import normalised_stack

from tests.conftest import random_fields

FACTOR = 4
VARS, STATICS = ["t2m", "tp"], ["orog", "lsm"]


def _data(n_time=7, n_lat=8, n_lon=16, seed=0):
    """Coarse fields (n_lat x n_lon) and fine statics on the exact 4-fold refinement."""
    fine, static = random_fields(n_time, FACTOR * n_lat, FACTOR * n_lon, res=0.25, seed=seed)
    coarse = fine.coarsen(lat=FACTOR, lon=FACTOR).mean()
    stats = compute_stats(xr.merge([fine, static]), VARS + STATICS)
    return coarse, fine, static, stats


def _payload(stats, div=(2, 2), halo=1, patch=2, pad_mode="symmetric"):
    return {"variables": VARS, "statics": STATICS, "stats": stats, "res_km": 111.0,
            "tiling": {"div_lat": div[0], "div_lon": div[1], "halo": halo,
                       "pad_mode": pad_mode, "factor": FACTOR},
            "model_config": {"patch_size": patch}, "config": {"seed": 1}}


class LocalModel(torch.nn.Module):
    """A model with a receptive field of exactly 1 coarse pixel (a 3x3 conv), for exactness.

    It pads its input by repeating the edge, as tiling with pad_mode "edge" does at the domain
    borders, so with that mode only inner tile borders can differ from an untiled prediction.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(len(VARS), len(VARS), 3, padding=1,
                                    padding_mode="replicate")
        self.calls: list[int] = []

    def forward(self, x, static, res_km):
        self.calls.append(len(x))
        up = F.interpolate(self.conv(x), scale_factor=FACTOR, mode="nearest")
        return up + 0.1 * static[:, :1]


def _tiny_reslim():
    torch.manual_seed(0)
    return build_model("tiny", VARS, VARS, STATICS, mag=FACTOR).eval()


def test_one_tile_without_halo_is_the_direct_model_output():
    coarse, _, static, stats = _data()
    model = _tiny_reslim()
    payload = _payload(stats, div=(1, 1), halo=0)
    # One chunk, one batch: the same tensor the direct call sees, so equality is bitwise.
    out = I.downscale(model, payload, coarse, static, time_chunk=coarse.sizes["time"])
    chunked = I.downscale(model, payload, coarse, static, batch_size=2, time_chunk=3)
    x = torch.from_numpy(normalised_stack(coarse, VARS, stats))
    s = torch.from_numpy(normalised_stack(static, STATICS, stats)).expand(len(x), -1, -1, -1)
    with torch.no_grad():
        direct = model(x, s, payload["res_km"]).numpy()
    for v, name in enumerate(VARS):
        expect = denormalise(direct[:, v].astype("float64"), stats[name]).astype("float32")
        np.testing.assert_array_equal(out[name].values, expect)
        # Other batch shapes change only the float rounding of the matrix products.
        np.testing.assert_allclose(chunked[name].values, expect, rtol=1e-5, atol=1e-5)
    assert (out["tp"].values >= 0).all()  # precipitation clipped at 0


def test_tiles_with_halo_covering_the_receptive_field_are_exact():
    coarse, _, static, stats = _data()
    model = LocalModel()
    payload = _payload(stats, div=(2, 2), halo=1, patch=1)
    whole = I.downscale(model, payload, coarse, static, div=(1, 1))  # same padding, one tile
    tiled = I.downscale(model, payload, coarse, static)
    for name in VARS:
        np.testing.assert_allclose(tiled[name].values, whole[name].values, rtol=1e-6, atol=1e-5)
    # Without the halo the tiles lose context at the inner borders: the check can fail.
    no_halo = I.downscale(model, payload, coarse, static, halo=0)
    assert np.abs(no_halo["t2m"].values - whole["t2m"].values).max() > 1e-3


def test_chunks_bound_memory_and_the_writer_sees_one_chunk_at_a_time(tmp_path, monkeypatch):
    coarse, _, static, stats = _data(n_time=7)
    model = LocalModel()
    payload = _payload(stats, patch=1)
    seen = []
    original = I.StreamWriter.append

    def record(self, chunk):
        seen.append(chunk.sizes["time"])
        original(self, chunk)

    monkeypatch.setattr(I.StreamWriter, "append", record)
    chunks = I.downscale_chunks(model, payload, coarse, static, batch_size=5, time_chunk=3)
    sizes = I.write_stream(chunks, tmp_path / "out.nc", "netcdf", {"a": "b"})
    assert sizes == seen == [3, 3, 1]
    assert max(model.calls) <= 5  # batches of tiles, never the whole chunk
    with xr.open_dataset(tmp_path / "out.nc") as ds:
        assert ds.sizes["time"] == 7
        np.testing.assert_array_equal(ds["time"].values, coarse["time"].values)
        whole = I.downscale(model, payload, coarse, static)
        np.testing.assert_array_equal(ds["t2m"].values, whole["t2m"].values)
    with netCDF4.Dataset(tmp_path / "out.nc") as nc:
        assert nc.dimensions["time"].isunlimited()
        assert nc["t2m"].chunking() == [1, 8 * FACTOR, 16 * FACTOR]


def _checkpoint(tmp_path, coarse, fine, static, stats):
    model = _tiny_reslim()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, variables=VARS, statics=STATICS, stats=stats,
                    tiling=_payload(stats)["tiling"], res_km=111.0, config={"seed": 7})
    coarse.to_netcdf(tmp_path / "coarse.nc")
    xr.merge([fine, static]).to_netcdf(tmp_path / "fine.nc")
    return path


@pytest.mark.parametrize("fmt", ["netcdf", "zarr"])
def test_output_carries_cf_attrs_and_provenance(tmp_path, fmt):
    coarse, fine, static, stats = _data(n_time=5)
    ckpt = _checkpoint(tmp_path, coarse, fine, static, stats)
    out = tmp_path / ("out.nc" if fmt == "netcdf" else "out.zarr")
    period = {"start": "2000-01-02", "end": "2000-01-04"}
    sizes = I.run_inference(ckpt, tmp_path / "coarse.nc", tmp_path / "fine.nc", out,
                            period=period, settings={"format": fmt, "time_chunk": 2})
    assert sizes == [2, 1]
    with I.open_downscaled(out) as ds:
        assert ds.sizes == {"time": 3, "lat": 32, "lon": 64}
        assert str(ds["time"].values[0])[:10] == "2000-01-02"
        assert ds.attrs["Conventions"].startswith("CF-")
        assert ds.attrs["checkpoint_sha256"] == file_sha256(ckpt)
        assert json.loads(ds.attrs["config"]) == {"seed": 7}
        assert "torch" in ds.attrs["software"] and "xarray" in ds.attrs["software"]
        assert ds["t2m"].attrs["units"] == "K"
        assert ds["t2m"].attrs["standard_name"] == "air_temperature"
        assert ds["tp"].attrs["units"] == "mm/day" and float(ds["tp"].min()) >= 0
        assert ds["lat"].attrs["units"] == "degrees_north" and ds["lon"].attrs["axis"] == "X"
        assert ds["time"].attrs["axis"] == "T"
        np.testing.assert_allclose(ds["lat"].values, static["lat"].values)
    assert not list(tmp_path.glob(".*tmp*"))


def test_several_processes_write_the_same_file(tmp_path):
    coarse, fine, static, stats = _data(n_time=5)
    ckpt = _checkpoint(tmp_path, coarse, fine, static, stats)
    args = (ckpt, tmp_path / "coarse.nc", tmp_path / "fine.nc")
    I.run_inference(*args, tmp_path / "one.nc", settings={"time_chunk": 2})
    sizes = I.run_inference(*args, tmp_path / "two.nc", settings={"time_chunk": 2, "processes": 2})
    assert max(sizes) <= 2 and sum(sizes) == 5
    with xr.open_dataset(tmp_path / "one.nc") as a, xr.open_dataset(tmp_path / "two.nc") as b:
        xr.testing.assert_equal(a, b)
    assert [p.name for p in tmp_path.iterdir() if "parts" in p.name] == []


def test_wrong_grid_and_missing_variables_are_clear_errors(tmp_path):
    coarse, _, static, stats = _data()
    model = LocalModel()
    shifted = coarse.assign_coords(lat=coarse["lat"] + 0.5)
    with pytest.raises(ValueError, match="regrid the input onto"):
        I.downscale(model, _payload(stats, patch=1), shifted, static)
    with pytest.raises(KeyError, match="tp"):
        I.downscale(model, _payload(stats, patch=1), coarse.drop_vars("tp"), static)
    with pytest.raises(ValueError, match="patch size"):
        I.downscale(_tiny_reslim(), _payload(stats, halo=1, patch=2), coarse.isel(lon=slice(0, 14)),
                    static.isel(lon=slice(0, 56)))


def test_an_interrupted_stream_leaves_no_file(tmp_path):
    coarse, _, static, stats = _data(n_time=4)
    chunks = I.downscale_chunks(LocalModel(), _payload(stats, patch=1), coarse, static,
                                time_chunk=2)

    def failing():
        yield next(chunks)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        I.write_stream(failing(), tmp_path / "out.nc")
    assert list(tmp_path.iterdir()) == []


def test_one_missing_coarse_cell_masks_only_the_fine_pixels_under_it():
    """Issue 18.1: a NaN coarse input is filled as in training (0 in normalised space) and only
    its own k x k fine block is masked; the tile and its neighbours' halos are untouched."""
    coarse, _, static, stats = _data(n_time=3)
    model = LocalModel()
    payload = _payload(stats, div=(2, 2), halo=1, patch=1)
    gap = coarse.copy(deep=True)
    gap["t2m"][1, 3, 7] = np.nan  # near the inner tile borders: its halo reaches 3 tiles
    full = I.downscale(model, payload, coarse, static)
    out = I.downscale(model, payload, gap, static)
    masked = np.isnan(out["t2m"].values)
    expect = np.zeros(masked.shape, bool)
    expect[1, 3 * FACTOR:4 * FACTOR, 7 * FACTOR:8 * FACTOR] = True
    np.testing.assert_array_equal(masked, expect)
    assert not np.isnan(out["tp"].values).any()  # tp's input is complete
    # the filled cell is the train mean, exactly as training saw it: tp is unaffected where the
    # receptive field does not reach the gap, and everything at other times is identical
    np.testing.assert_array_equal(out["t2m"].values[[0, 2]], full["t2m"].values[[0, 2]])
    tally = I.MaskedTally()
    list(tally.watch(I.downscale_chunks(model, payload, gap, static, progress=False)))
    assert tally.fractions()["t2m"] == pytest.approx(FACTOR**2 / masked.size)
    assert tally.fractions()["tp"] == 0
    assert "t2m" in tally.summary()


def test_missing_output_mask_for_a_target_that_is_not_an_input():
    missing = np.zeros((1, 2, 2, 2), bool)
    missing[0, 0, 0, 0] = True  # only input a missing: a target not among inputs keeps data
    missing[0, :, 1, 1] = True  # both inputs missing: every target lacks data
    mask = I.missing_output_mask(missing, ["a", "b"], ["a", "c"], factor=2)
    assert mask.shape == (1, 2, 4, 4)
    assert mask[0, 0, :2, :2].all() and mask[0, 0, 2:, 2:].all() and mask[0, 0].sum() == 8
    assert mask[0, 1, 2:, 2:].all() and mask[0, 1].sum() == 4


def _dropout_reslim():
    torch.manual_seed(0)
    return build_model("tiny", VARS, VARS, STATICS, mag=FACTOR, dropout=0.3).eval()


def test_mc_dropout_members_differ_and_are_reproducible(tmp_path):
    coarse, _, static, stats = _data(n_time=3)
    payload = _payload(stats, div=(1, 1), halo=0)
    det = I.downscale(_dropout_reslim(), payload, coarse, static)
    assert "member" not in det.dims
    ens = I.downscale(_dropout_reslim(), payload, coarse, static, mc_members=3, seed=5)
    assert ens["t2m"].dims == ("time", "member", "lat", "lon") and ens.sizes["member"] == 3
    assert ens["member"].attrs["standard_name"] == "realization"
    spread = ens["t2m"].std("member")
    assert float((spread > 0).mean()) > 0.9  # dropout on: members differ
    again = I.downscale(_dropout_reslim(), payload, coarse, static, mc_members=3, seed=5)
    np.testing.assert_array_equal(again["t2m"].values, ens["t2m"].values)
    other = I.downscale(_dropout_reslim(), payload, coarse, static, mc_members=3, seed=6)
    assert np.abs(other["t2m"].values - ens["t2m"].values).max() > 0
    # the model is left in eval mode otherwise: deterministic runs are unchanged
    np.testing.assert_array_equal(I.downscale(_dropout_reslim(), payload, coarse, static)
                                  ["t2m"].values, det["t2m"].values)
    with pytest.raises(ValueError, match="model.dropout"):
        I.downscale(_tiny_reslim(), payload, coarse, static, mc_members=2)
    I.write_stream(I.downscale_chunks(_dropout_reslim(), payload, coarse, static,
                                      mc_members=2, time_chunk=2), tmp_path / "ens.nc")
    with xr.open_dataset(tmp_path / "ens.nc") as ds:
        assert ds["tp"].dims == ("time", "member", "lat", "lon") and ds.sizes["time"] == 3


def test_deep_ensemble_of_checkpoints_and_processes(tmp_path):
    coarse, fine, static, stats = _data(n_time=4)
    ckpt = _checkpoint(tmp_path, coarse, fine, static, stats)
    torch.manual_seed(1)
    other = build_model("tiny", VARS, VARS, STATICS, mag=FACTOR)
    save_checkpoint(tmp_path / "other.pt", other, variables=VARS, statics=STATICS, stats=stats,
                    tiling=_payload(stats)["tiling"], res_km=111.0, config={"seed": 8})
    args = (ckpt, tmp_path / "coarse.nc", tmp_path / "fine.nc")
    ens = {"checkpoints": [str(tmp_path / "other.pt")], "mc_dropout": 0, "seed": 0}
    I.run_inference(*args, tmp_path / "ens.nc", settings={"time_chunk": 2, "ensemble": ens})
    I.run_inference(*args, tmp_path / "one.nc", settings={"time_chunk": 2})
    I.run_inference(*args, tmp_path / "ens2.nc",
                    settings={"time_chunk": 2, "ensemble": ens, "processes": 2})
    with (xr.open_dataset(tmp_path / "ens.nc") as e, xr.open_dataset(tmp_path / "one.nc") as o,
          xr.open_dataset(tmp_path / "ens2.nc") as e2):
        assert e.sizes["member"] == 2 and "ensemble" in e.attrs
        np.testing.assert_allclose(e["t2m"].isel(member=0).values, o["t2m"].values,
                                   rtol=1e-6, atol=1e-4)  # member 0 is the main checkpoint
        assert np.abs(e["t2m"].isel(member=1) - o["t2m"]).max() > 1e-3
        np.testing.assert_allclose(e2["t2m"].values, e["t2m"].values, rtol=1e-6, atol=1e-4)
    bad = build_model("tiny", VARS, VARS, STATICS, mag=FACTOR)
    save_checkpoint(tmp_path / "bad.pt", bad, variables=VARS, statics=STATICS, stats=stats,
                    tiling={**_payload(stats)["tiling"], "halo": 2}, res_km=111.0)
    with pytest.raises(ValueError, match="tiling"):
        I.run_inference(*args, tmp_path / "x.nc",
                        settings={"ensemble": {"checkpoints": [str(tmp_path / "bad.pt")]}})
