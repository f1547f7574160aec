"""Reslim vs the upsample-first ViT: training-step time and peak memory per coarse input size
and magnification (output resolution = coarse size x mag; ``--mags 4 8 16``).

Both models get the same width / depth / heads (one preset), the same coarse input, statics and
target, and the same AdamW. Reslim runs its transformer on the coarse grid; UpsampleViT upsamples
by ``mag`` first and so carries ``mag^2`` more tokens. Each (model, size) case runs in a fresh
process (peak memory, see ``common``): one warm-up step (measured for peak memory: it is the step
that also allocates gradients and the optimizer state), then ``--repeats`` timed steps.

    python benchmarks/bench_reslim_vs_baseline.py                       # CPU defaults
    python benchmarks/bench_reslim_vs_baseline.py --preset 9.5M --sizes 16 32 64 --batch 8
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    PeakMemory,
    fmt_bytes,
    model_config,
    pick_device,
    print_table,
    random_batch,
    run_isolated,
    time_fn,
)
from common import write_results as save
from downscaler.model.baseline import UpsampleViT
from downscaler.model.presets import PRESETS
from downscaler.model.reslim import Reslim


def run_case(
    kind: str, size: int, preset: str, batch: int, device: str, repeats: int, threads: int,
    mag: int | None = None,
) -> dict[str, Any]:
    """One (model, coarse size) case in this (fresh) process: peak memory and step time."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    cfg = model_config(preset)
    if mag:
        cfg = dataclasses.replace(cfg, mag=mag)
    model = (Reslim if kind == "reslim" else UpsampleViT)(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    x, static, y = random_batch(cfg, batch, size, dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x, static, 25.0), y).backward()
        opt.step()

    with PeakMemory(dev) as peak:
        step()
    timing = time_fn(step, dev, warmup=1, repeats=repeats)
    tokens = (size // cfg.patch_size) ** 2 * (1 if kind == "reslim" else cfg.mag**2)
    return {
        "model": kind,
        "coarse": size,
        "mag": cfg.mag,
        "fine": size * cfg.mag,
        "tokens": tokens,
        "samples_per_s": batch / timing["min_s"],
        "step_s": timing["min_s"],
        "timing": timing,
        "peak_bytes": peak.bytes,
        "memory_method": peak.method,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument(
        "--sizes", type=int, nargs="+", help="coarse square sizes (default: 8 16 32 on CPU, "
        "16 32 64 on GPU)",
    )  # fmt: skip
    parser.add_argument(
        "--mags", type=int, nargs="+", help="magnifications (default: the preset's)"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = parser.parse_args()
    dev = pick_device(args.device)
    sizes = args.sizes or ([16, 32, 64] if dev.type == "cuda" else [8, 16, 32])

    rows, cases = [], []
    for mag, size in [(m, s) for m in (args.mags or [None]) for s in sizes]:
        res = {}
        for kind in ("reslim", "upsample_vit"):
            res[kind] = run_isolated(
                run_case, kind=kind, size=size, preset=args.preset, batch=args.batch,
                device=str(dev), repeats=args.repeats, threads=args.threads, mag=mag,
            )  # fmt: skip
            cases.append(res[kind])
        r, u = res["reslim"], res["upsample_vit"]
        rows.append(
            {
                "mag": r["mag"],
                "coarse": f"{size}x{size}",
                "fine": f"{r['fine']}x{r['fine']}",
                "tokens R/U": f"{r['tokens']}/{u['tokens']}",
                "Reslim s": r["step_s"],
                "UpsampleViT s": u["step_s"],
                "speed-up": u["step_s"] / r["step_s"],
                "Reslim mem": fmt_bytes(r["peak_bytes"]),
                "UpsampleViT mem": fmt_bytes(u["peak_bytes"]),
                "mem ratio": u["peak_bytes"] / max(r["peak_bytes"], 1),
            }
        )
    print_table(
        rows, list(rows[0]),
        title=f"training step (fwd+bwd+AdamW), preset {args.preset}, batch {args.batch}, {dev}, "
        f"peak memory by {cases[0]['memory_method']}",
    )  # fmt: skip
    save(
        "reslim_vs_baseline",
        {"args": vars(args), "sizes": sizes, "cases": cases, "ratios": rows},
        dev,
    )


if __name__ == "__main__":
    main()
