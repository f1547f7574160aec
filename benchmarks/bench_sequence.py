"""Sequence-length scaling: step time and peak memory per rank vs tokens, sp = 1 and sp = 2
(Ulysses vs LSS), on local gloo processes (or NCCL when there are GPUs enough).

Each configuration runs in one spawned world (1 or 2 processes, one torch thread each) that
trains a small Reslim one warm-up step and ``--repeats`` timed steps (forward, backward, the
sequence-parallel gradient reduction, AdamW) at every sequence length. Peak memory per rank is
torch's ``MemTracker`` over one step after the warm-up: the bytes of every live tensor
(parameters, gradients, AdamW moments, activations, temporaries), exact and comparable across
devices, unlike the CPU's resident set. The planner's estimate (``parallel.planner``) is written
next to each measurement.

JSON (``benchmarks/results/sequence.json``; the rule ``bench_sequence`` writes it as
``results/benchmarks/<size>/sequence.json``), besides ``args``/``machine``/``command``:

- ``rows``: one per (configuration, sequence length) with ``config`` ("sp1", "ulysses_sp2",
  "lss_sp2"), ``sp_mode``, ``sp``, ``processes``, ``device``, ``coarse_pixels`` (side of the
  square coarse tile), ``tokens`` (coarse pixels / patch^2), ``step_time_s`` (median),
  ``step_time_min_s``, ``peak_bytes_per_rank`` (max over ranks), ``peak_bytes_ranks`` (each rank),
  ``estimate_bytes_per_rank`` (planner), ``fits_cap`` (peak <= ``cap_bytes``);
- ``largest_tokens_under_cap``: per configuration, the most tokens measured with
  ``peak_bytes_per_rank <= cap_bytes`` (null if none);
- ``cap_bytes``, ``memory_method``, ``table`` (the printed rows).

Usage (about half a minute on 2 CPU cores)::

    python benchmarks/bench_sequence.py
    python benchmarks/bench_sequence.py --sizes 16 32 48 64 --cap-mib 64 --dim 128
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import fmt_bytes, pick_device, print_table, write_results
from downscaler.launcher import spawn
from downscaler.model.presets import build_model
from downscaler.parallel import Layout, build_mesh, parallelize, reduce_gradients
from downscaler.parallel.planner import ModelSize, estimate_memory, tokens_per_tile
from torch.distributed._tools.mem_tracker import MemTracker

VARS = (["t2m", "tp"], ["t2m"], ["orog"])
CONFIGS = {"sp1": (1, "ulysses"), "ulysses_sp2": (2, "ulysses"), "lss_sp2": (2, "lss")}
MEMORY_METHOD = "torch.distributed._tools.mem_tracker.MemTracker peak (live tensor bytes)"


def _model_kwargs(args: dict[str, Any]) -> dict[str, Any]:
    return {"embed_dim": args["dim"], "depth": args["depth"], "num_heads": args["heads"],
            "mag": args["mag"], "residual_channels": 8, "decoder_depth": 1}


def measure_rank(rank: int, world: int, mode: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    """On this rank: step time and peak tensor bytes at every size in ``args["sizes"]``."""
    layout = Layout(sp=world, sp_mode=mode)
    device = torch.device("cuda", rank) if args["cuda"] else torch.device("cpu")
    mesh = build_mesh(layout, device.type)
    out = []
    for size in args["sizes"]:
        torch.manual_seed(0)
        model = build_model("tiny", *VARS, **_model_kwargs(args)).to(device)
        model = parallelize(model, layout, mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(1)
        fine = size * args["mag"]
        x = torch.randn(args["batch"], 2, size, size, generator=g).to(device)
        static = torch.randn(args["batch"], 1, fine, fine, generator=g).to(device)
        y = torch.randn(args["batch"], 1, fine, fine, generator=g).to(device)

        def step() -> None:
            F.mse_loss(model(x, static, 25.0), y).backward()  # noqa: B023
            reduce_gradients(model, layout, mesh)  # noqa: B023
            opt.step()  # noqa: B023
            opt.zero_grad()  # noqa: B023
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        step()  # warm-up: AdamW moments exist from here on
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            step()
        peak = int(sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values()))
        times = []
        for _ in range(args["repeats"]):
            torch.distributed.barrier()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        out.append({"size": size, "peak_bytes": peak, "median_s": statistics.median(times),
                    "min_s": min(times)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 48],
                        help="coarse tile sides (tokens = (side / patch)^2)")
    parser.add_argument("--dim", type=int, default=64, help="embed_dim")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mag", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cap-mib", type=float, default=12.0,
                        help="per-process memory cap for largest_tokens_under_cap")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    dev = pick_device("auto")
    opts = vars(args)
    size_info = ModelSize.from_preset("tiny", 2, 1, 1, **_model_kwargs(opts))
    patch = size_info.cfg.patch_size
    cap = int(args.cap_mib * 2**20)
    rows, table = [], []
    for name in args.configs:
        sp, mode = CONFIGS[name]
        # one GPU per rank (NCCL), else gloo on the CPU
        cuda = dev.type == "cuda" and torch.cuda.device_count() >= sp
        ranks = spawn(measure_rank, sp, mode, {**opts, "cuda": cuda}, timeout=600,
                      device="cuda" if cuda else "cpu")
        for i, size in enumerate(args.sizes):
            per_rank = [r[i] for r in ranks]
            tokens = tokens_per_tile(size, size, patch)
            peak = max(r["peak_bytes"] for r in per_rank)
            estimate = estimate_memory(size_info, tokens, Layout(sp=sp, sp_mode=mode),
                                       args.batch)["total"]
            rows.append({
                "config": name, "sp_mode": mode if sp > 1 else None, "sp": sp, "processes": sp,
                "device": "cuda" if cuda else "cpu",
                "coarse_pixels": size, "tokens": tokens,
                "step_time_s": max(r["median_s"] for r in per_rank),
                "step_time_min_s": max(r["min_s"] for r in per_rank),
                "peak_bytes_per_rank": peak,
                "peak_bytes_ranks": [r["peak_bytes"] for r in per_rank],
                "estimate_bytes_per_rank": estimate, "fits_cap": peak <= cap})
            table.append({"config": name, "tokens": tokens,
                          "step ms": 1000 * rows[-1]["step_time_s"],
                          "peak/rank": fmt_bytes(peak), "estimate": fmt_bytes(estimate),
                          f"<= {args.cap_mib:g} MiB": "yes" if peak <= cap else "no"})
    largest = {}
    for name in args.configs:
        fit = [r["tokens"] for r in rows if r["config"] == name and r["fits_cap"]]
        largest[name] = max(fit) if fit else None
    print_table(table, list(table[0]),
                title=f"sequence scaling, D={args.dim}, depth {args.depth}, {args.heads} heads, "
                f"batch {args.batch}, {dev} ({MEMORY_METHOD})")
    print("largest tokens under the cap:", largest)
    write_results("sequence", {"args": opts, "rows": rows, "cap_bytes": cap,
                               "largest_tokens_under_cap": largest,
                               "memory_method": MEMORY_METHOD, "table": table}, dev)


if __name__ == "__main__":
    main()
