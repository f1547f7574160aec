"""TILES scaling: time per sample as the domain grows 1x, 4x, 16x in area, tiled vs untiled.

A sample is one whole domain of ``side x side`` coarse pixels (side = tile, 2*tile, 4*tile).
Tiled: the domain is cut with ``downscaler.tiling.tile`` into ``(side/tile)^2`` tiles of
``tile + 2*halo`` pixels, run as one batch, so attention never crosses tiles and the work grows
with the number of tiles (linearly in area). Untiled: the whole domain is one sequence, so
self-attention grows quadratically in area. Timed: forward + backward of Reslim (the per-sample
compute of training; the optimizer step does not depend on the domain).

    python benchmarks/bench_tiles_scaling.py                            # CPU defaults
    python benchmarks/bench_tiles_scaling.py --preset 9.5M --tile 64 --halo 4 --growth 1 2 4 8
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import IN_VARS, OUT_VARS, STATICS, model_config, pick_device, print_table, sync, time_fn
from common import write_results as save
from downscaler.model.presets import PRESETS
from downscaler.model.reslim import Reslim
from downscaler.tiling import tile as tile_array


def make_inputs(
    side: int, tile: int, halo: int, mag: int, tiled: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One domain sample: as a batch of halo'd tiles (tiled) or as one image (untiled)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(IN_VARS), side, side)).astype("float32")
    static = rng.standard_normal((len(STATICS), side * mag, side * mag)).astype("float32")
    y = rng.standard_normal((len(OUT_VARS), side * mag, side * mag)).astype("float32")
    if tiled:
        div = side // tile
        # tile() returns [C, n_tiles, th, tw]; the tiles become the batch.
        x = tile_array(x, div, div, halo).swapaxes(0, 1)
        static = tile_array(static, div, div, halo * mag).swapaxes(0, 1)
        y = tile_array(y, div, div, halo * mag).swapaxes(0, 1)
    else:
        x, static, y = x[None], static[None], y[None]
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (x, static, y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--tile", type=int, default=32, help="tile core size, coarse pixels")
    parser.add_argument("--halo", type=int, default=2, help="halo, coarse pixels")
    parser.add_argument("--growth", type=int, nargs="+", default=[1, 2, 4], help="side factors")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    torch.manual_seed(0)
    cfg = model_config(args.preset)
    model = Reslim(cfg).to(dev)
    if (args.tile + 2 * args.halo) % cfg.patch_size:
        raise SystemExit(f"--tile + 2*--halo must be divisible by patch_size={cfg.patch_size}")

    cases: list[dict[str, Any]] = []
    for factor in args.growth:
        side = args.tile * factor
        for tiled in (True, False):
            x, static, y = make_inputs(side, args.tile, args.halo, cfg.mag, tiled, dev)

            def step(x=x, static=static, y=y) -> None:
                model.zero_grad(set_to_none=True)
                F.mse_loss(model(x, static, 25.0), y).backward()

            timing = time_fn(step, dev, warmup=1, repeats=args.repeats)
            sync(dev)
            seq = (x.shape[-1] // cfg.patch_size) * (x.shape[-2] // cfg.patch_size)
            cases.append(
                {
                    "area": factor**2,
                    "side": side,
                    "mode": "tiled" if tiled else "untiled",
                    "sequences": x.shape[0],
                    "tokens_per_sequence": seq,
                    "s_per_sample": timing["min_s"],
                    "samples_per_s": 1 / timing["min_s"],
                    "domain_pixels": side * side,
                    "timing": timing,
                }
            )
            print(f"  area {factor**2:>3}x {cases[-1]['mode']:>8}: {timing['min_s']:.4g} s")

    base = {c["mode"]: c["s_per_sample"] for c in cases if c["area"] == 1}
    rows = []
    for factor in args.growth:
        t, u = (
            next(c for c in cases if c["area"] == factor**2 and c["mode"] == m)
            for m in ("tiled", "untiled")
        )
        rows.append(
            {
                "area": f"{factor**2}x",
                "domain": f"{t['side']}x{t['side']}",
                "tiles x tokens": f"{t['sequences']} x {t['tokens_per_sequence']}",
                "tiled s": t["s_per_sample"],
                "tiled growth": t["s_per_sample"] / base["tiled"],
                "untiled tokens": u["tokens_per_sequence"],
                "untiled s": u["s_per_sample"],
                "untiled growth": u["s_per_sample"] / base["untiled"],
                "untiled/tiled": u["s_per_sample"] / t["s_per_sample"],
            }
        )
    print_table(
        rows, list(rows[0]),
        title=f"fwd+bwd per domain sample, preset {args.preset}, tile {args.tile} + halo "
        f"{args.halo} (coarse px), {dev}; ideal linear growth = area",
    )  # fmt: skip
    save("tiles_scaling", {"args": vars(args), "cases": cases, "ratios": rows}, dev)


if __name__ == "__main__":
    main()
