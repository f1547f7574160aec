"""TILES: stitch(tile(x)) == x exactly, halos hold the right neighbours, periodic wrap."""

import numpy as np
import pytest
from downscaler.tiling import check_tiling, stitch, tile
from hypothesis import given, settings
from hypothesis import strategies as st


@st.composite
def tiled_fields(draw):
    div_lat, div_lon = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    tile_h, tile_w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    halo = draw(st.integers(0, 5))
    lead = draw(st.lists(st.integers(1, 3), max_size=2))
    seed = draw(st.integers(0, 2**31))
    x = np.random.default_rng(seed).normal(size=(*lead, div_lat * tile_h, div_lon * tile_w))
    return x, div_lat, div_lon, halo


@settings(max_examples=150, deadline=None)
@given(tiled_fields(), st.booleans(), st.sampled_from(["symmetric", "edge"]))
def test_stitch_of_tile_is_identity(case, periodic, pad_mode):
    x, div_lat, div_lon, halo = case
    tiles = tile(x, div_lat, div_lon, halo, periodic_lon=periodic, pad_mode=pad_mode)
    assert tiles.shape[-3:] == (div_lat * div_lon, x.shape[-2] // div_lat + 2 * halo,
                                x.shape[-1] // div_lon + 2 * halo)
    np.testing.assert_array_equal(stitch(tiles, div_lat, div_lon, halo), x)
    blended = stitch(tiles, div_lat, div_lon, halo, blend=True, periodic_lon=periodic)
    np.testing.assert_allclose(blended, x, rtol=1e-12, atol=1e-12)


def test_periodic_halo_of_last_lon_tile_holds_first_columns():
    x = np.arange(8 * 12, dtype=float).reshape(8, 12)
    tiles = tile(x, div_lat=2, div_lon=3, halo=2, periodic_lon=True)
    last = tiles[2]  # first row of tiles, last longitude tile
    np.testing.assert_array_equal(last[2:-2, -2:], x[0:4, 0:2])
    first = tiles[0]
    np.testing.assert_array_equal(first[2:-2, :2], x[0:4, -2:])


def test_inner_halos_hold_neighbours_and_borders_are_padded():
    x = np.arange(8 * 8, dtype=float).reshape(8, 8)
    tiles = tile(x, 2, 2, halo=1, pad_mode="edge")
    np.testing.assert_array_equal(tiles[0][1:-1, -1], x[0:4, 4])  # east halo = next tile
    np.testing.assert_array_equal(tiles[0][0, 1:-1], x[0, 0:4])  # north border: edge padding
    np.testing.assert_array_equal(tiles[0][1:-1, 0], x[0:4, 0])  # west border, not periodic


def test_coarse_and_fine_tiles_are_colocated():
    k, halo = 4, 2
    coarse = np.random.default_rng(0).normal(size=(6, 8))
    fine = np.repeat(np.repeat(coarse, k, axis=0), k, axis=1)
    for periodic in (True, False):
        for mode in ("symmetric", "edge"):
            tc = tile(coarse, 3, 2, halo, periodic_lon=periodic, pad_mode=mode)
            tf = tile(fine, 3, 2, k * halo, periodic_lon=periodic, pad_mode=mode)
            np.testing.assert_array_equal(np.repeat(np.repeat(tc, k, axis=-2), k, axis=-1), tf)


def test_blending_smooths_disagreeing_overlaps():
    x = np.zeros((4, 8))
    tiles = tile(x, 1, 2, halo=2)
    tiles[0] += 1.0  # the two tiles disagree in their overlap
    hard = stitch(tiles, 1, 2, 2)
    soft = stitch(tiles, 1, 2, 2, blend=True)
    assert set(np.unique(hard)) == {0.0, 1.0}
    seam = soft[:, 3:5]
    assert np.all((seam > 0) & (seam < 1))  # a smooth transition across the seam


def test_bad_divisions_name_valid_choices():
    with pytest.raises(ValueError, match=r"valid div_lat: \[1, 2, 3, 6\]"):
        tile(np.zeros((6, 8)), 4, 2, 1)
    with pytest.raises(ValueError, match="patch size 2; try div_lat in"):
        check_tiling((16, 32), div_lat=16, div_lon=2, halo=2, patch_size=2)
    check_tiling((16, 32), div_lat=2, div_lon=2, halo=2, patch_size=2)
