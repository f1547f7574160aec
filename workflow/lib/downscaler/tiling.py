"""TILES: cut a grid into tiles with halos, and stitch tiles back (ORBIT-2, arXiv 2505.04802).

Pure functions on the last two axes (lat, lon) of numpy arrays, used by the tile stage and by
inference alike. A field of shape [..., H, W] becomes [..., div_lat*div_lon, th + 2h, tw + 2h]
with th = H / div_lat, tw = W / div_lon and a halo of h pixels on every side, tiles in row-major
order. Halos beyond the domain come from padding: periodic wrap in longitude for global grids
(ORBIT-2 lacks this, so its edge tiles see no neighbours across the date line), mirror
(symmetric) or edge padding at the poles and region borders, so every tile has one shape.
Tiling a coarse field with halo h and its k-fold fine field with halo k*h gives co-located
tile pairs.

Stitching crops the halos and places the cores (exact); `blend=True` instead averages the
overlapping halos with a smooth window (exact on identity inputs up to rounding).
"""

from __future__ import annotations

import numpy as np

# "symmetric" mirrors about the grid edge (not the edge pixel, as numpy's "reflect" does), so a
# coarse field and its k-fold fine field are padded consistently and tiles stay co-located.
PAD_MODES = ("symmetric", "edge")


def tile(
    x: np.ndarray,
    div_lat: int,
    div_lon: int,
    halo: int,
    periodic_lon: bool = False,
    pad_mode: str = "symmetric",
) -> np.ndarray:
    """Split [..., H, W] into [..., div_lat*div_lon, H/div_lat + 2*halo, W/div_lon + 2*halo]."""
    height, width = x.shape[-2:]
    tile_h, tile_w = tile_core_shape((height, width), div_lat, div_lon)
    if halo < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    lead = [(0, 0)] * (x.ndim - 2)
    padded = np.pad(x, [*lead, (halo, halo), (0, 0)], mode=pad_mode)
    lon_mode = "wrap" if periodic_lon else pad_mode
    padded = np.pad(padded, [*lead, (0, 0), (halo, halo)], mode=lon_mode)
    full_h, full_w = tile_h + 2 * halo, tile_w + 2 * halo
    tiles = [
        padded[..., i * tile_h : i * tile_h + full_h, j * tile_w : j * tile_w + full_w]
        for i in range(div_lat)
        for j in range(div_lon)
    ]
    return np.stack(tiles, axis=-3)


def stitch(
    tiles: np.ndarray,
    div_lat: int,
    div_lon: int,
    halo: int,
    blend: bool = False,
    periodic_lon: bool = False,
) -> np.ndarray:
    """Inverse of `tile`: [..., n_tiles, th + 2h, tw + 2h] -> [..., div_lat*th, div_lon*tw]."""
    n_tiles, full_h, full_w = tiles.shape[-3:]
    if n_tiles != div_lat * div_lon:
        raise ValueError(f"got {n_tiles} tiles, expected div_lat*div_lon = {div_lat * div_lon}")
    tile_h, tile_w = full_h - 2 * halo, full_w - 2 * halo
    if tile_h <= 0 or tile_w <= 0:
        raise ValueError(f"tiles of {full_h}x{full_w} are too small for a halo of {halo}")
    if blend and halo > 0:
        return _stitch_blended(tiles, div_lat, div_lon, halo, periodic_lon)
    out = np.empty((*tiles.shape[:-3], div_lat * tile_h, div_lon * tile_w), dtype=tiles.dtype)
    for n in range(n_tiles):
        i, j = divmod(n, div_lon)
        out[..., i * tile_h : (i + 1) * tile_h, j * tile_w : (j + 1) * tile_w] = tiles[
            ..., n, halo : halo + tile_h, halo : halo + tile_w
        ]
    return out


def _stitch_blended(
    tiles: np.ndarray, div_lat: int, div_lon: int, halo: int, periodic_lon: bool
) -> np.ndarray:
    """Weighted average of all tiles covering each pixel; halo weights taper to ~0 at tile edges."""
    full_h, full_w = tiles.shape[-2:]
    tile_h, tile_w = full_h - 2 * halo, full_w - 2 * halo
    height, width = div_lat * tile_h, div_lon * tile_w
    window = np.outer(blend_window(full_h, halo), blend_window(full_w, halo))
    lead = tiles.shape[:-3]
    # Accumulate on a canvas padded by the halo, then fold or crop the padding away.
    total = np.zeros((*lead, height + 2 * halo, width + 2 * halo))
    weight = np.zeros((height + 2 * halo, width + 2 * halo))
    for n in range(div_lat * div_lon):
        i, j = divmod(n, div_lon)
        rows = slice(i * tile_h, i * tile_h + full_h)
        cols = slice(j * tile_w, j * tile_w + full_w)
        total[..., rows, cols] += tiles[..., n, :, :] * window
        weight[rows, cols] += window
    if periodic_lon:
        total, weight = _fold_columns(total, width, halo), _fold_columns(weight, width, halo)
    else:
        total, weight = total[..., halo : halo + width], weight[:, halo : halo + width]
    out = total[..., halo : halo + height, :] / weight[halo : halo + height, :]
    return out.astype(tiles.dtype)


def _fold_columns(canvas: np.ndarray, width: int, halo: int) -> np.ndarray:
    """Add the halo columns of a periodic canvas onto the columns they wrap around to."""
    folded = np.zeros((*canvas.shape[:-1], width))
    for c in range(canvas.shape[-1]):
        folded[..., (c - halo) % width] += canvas[..., c]
    return folded


def blend_window(size: int, halo: int) -> np.ndarray:
    """1-D weights: 1 on the core, a raised-cosine taper inside the halo (never exactly 0)."""
    w = np.ones(size)
    if halo > 0:
        ramp = np.sin(0.5 * np.pi * np.arange(1, halo + 1) / (halo + 1)) ** 2
        w[:halo] = ramp
        w[size - halo :] = ramp[::-1]
    return w


def tile_core_shape(shape: tuple[int, int], div_lat: int, div_lon: int) -> tuple[int, int]:
    """Core (halo-free) tile shape; the grid must divide evenly."""
    height, width = shape
    if div_lat < 1 or div_lon < 1:
        raise ValueError(f"div_lat and div_lon must be >= 1, got {div_lat}, {div_lon}")
    if height % div_lat or width % div_lon:
        raise ValueError(
            f"a {height}x{width} grid does not split into {div_lat}x{div_lon} equal tiles; "
            f"valid div_lat: {divisors(height)}, valid div_lon: {divisors(width)}"
        )
    return height // div_lat, width // div_lon


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tiling(
    shape: tuple[int, int], div_lat: int, div_lon: int, halo: int, patch_size: int
) -> None:
    """Raise a ValueError proposing the nearest valid settings when tiles won't fit the model.

    Tiles (core + 2 halo) on the coarse grid must be divisible by the model's patch size.
    """
    tile_h, tile_w = tile_core_shape(shape, div_lat, div_lon)
    problems = []
    for name, size, div, total in (("div_lat", tile_h, div_lat, shape[0]),
                                   ("div_lon", tile_w, div_lon, shape[1])):
        if (size + 2 * halo) % patch_size:
            ok = [d for d in divisors(total) if (total // d + 2 * halo) % patch_size == 0]
            nearest = sorted(ok, key=lambda d: abs(d - div))[:3]
            problems.append(
                f"{name}={div} gives tiles of {size}+2*{halo} coarse pixels, not divisible by the "
                f"patch size {patch_size}; try {name} in {nearest}"
            )
    if problems:
        halos = [h for h in range(0, 2 * patch_size + 1)
                 if (tile_h + 2 * h) % patch_size == 0 and (tile_w + 2 * h) % patch_size == 0]
        raise ValueError("; ".join(problems) + f" (or a halo in {halos})")
