"""Inference speed: milliseconds per sample at batch 1 and at the best batch, with peak memory.

A sample is one tile (``--tile`` coarse pixels square, halo included) downscaled by Reslim in
``torch.inference_mode``: what the infer stage streams through the model, tile batch after tile
batch. Each batch size runs in a fresh process (peak memory, see ``common``). ORBIT-2 reports
4 ms per sample for its 9.5M model on GPUs (a reference, not comparable with a CPU number).

    python benchmarks/bench_inference.py                                 # CPU defaults
    python benchmarks/bench_inference.py --preset 9.5M --tile 64 --batches 1 8 32 128
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
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
from downscaler.model.presets import PRESETS
from downscaler.model.reslim import Reslim


def run_case(
    preset: str, tile: int, batch: int, device: str, repeats: int, threads: int
) -> dict[str, Any]:
    """One batch size in this (fresh) process: peak memory of the first call, then timings."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    cfg = model_config(preset)
    model = Reslim(cfg).to(dev).eval()
    x, static, _ = random_batch(cfg, batch, tile, dev)

    def infer() -> None:
        with torch.inference_mode():
            model(x, static, 25.0)

    with PeakMemory(dev) as peak:
        infer()
    timing = time_fn(infer, dev, warmup=1, repeats=repeats)
    return {
        "batch": batch,
        "ms_per_sample": 1000 * timing["min_s"] / batch,
        "samples_per_s": batch / timing["min_s"],
        "timing": timing,
        "peak_bytes": peak.bytes,
        "memory_method": peak.method,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="9.5M", choices=sorted(PRESETS))
    parser.add_argument("--tile", type=int, default=32, help="coarse tile side, halo included")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = parser.parse_args()
    dev = pick_device(args.device)
    cases = [
        run_isolated(
            run_case, preset=args.preset, tile=args.tile, batch=b, device=str(dev),
            repeats=args.repeats, threads=args.threads,
        )  # fmt: skip
        for b in args.batches
    ]
    best = min(cases, key=lambda c: c["ms_per_sample"])
    rows = [
        {
            "batch": c["batch"],
            "ms/sample": c["ms_per_sample"],
            "samples/s": c["samples_per_s"],
            "peak mem": fmt_bytes(c["peak_bytes"]),
        }
        for c in cases
    ]
    print_table(
        rows, list(rows[0]),
        title=f"inference, preset {args.preset}, tile {args.tile}x{args.tile} coarse -> "
        f"{args.tile * model_config(args.preset).mag} fine, {dev}",
    )  # fmt: skip
    summary = {
        "batch1_ms_per_sample": next((c["ms_per_sample"] for c in cases if c["batch"] == 1), None),
        "best_batch": best["batch"],
        "best_ms_per_sample": best["ms_per_sample"],
        "best_peak_bytes": best["peak_bytes"],
    }
    save("inference", {"args": vars(args), "cases": cases, "summary": summary}, dev)


if __name__ == "__main__":
    main()
