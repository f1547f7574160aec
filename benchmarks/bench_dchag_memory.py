"""D-CHAG memory: per-rank peak memory of tokenisation + channel aggregation, many channels.

Measured: forward + backward of ``model.aggregator(model.tokenizer(x, static))`` (the stage
D-CHAG replaces) for C coarse input channels, on every rank of the group:

- ``TP, no D-CHAG``: tensor parallelism leaves this stage replicated, so every rank tokenises
  all C channels and aggregates them: the same work and memory on every rank whatever the TP
  size; measured once, in one process.
- ``D-CHAG tp=N``: ``apply_dchag`` over N spawned ranks (gloo on CPU; nccl when the machine has
  at least N GPUs, one per rank); each rank embeds C/N channels. Reported: the largest rank.

Peak memory per rank as in ``common`` (every rank is a fresh process).

    python benchmarks/bench_dchag_memory.py                              # CPU defaults
    python benchmarks/bench_dchag_memory.py --channels 128 256 512 --dim 1024 --size 64
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.distributed as dist
from common import PeakMemory, fmt_bytes, pick_device, print_table, run_isolated, sync
from common import write_results as save
from downscaler.launcher import spawn
from downscaler.model.presets import build_model
from downscaler.model.reslim import Reslim
from downscaler.parallel.dchag import apply_dchag


def build(channels: int, dim: int, heads: int, device: torch.device) -> Reslim:
    """A one-block Reslim with ``channels`` coarse inputs (only the token stage is exercised)."""
    torch.manual_seed(0)
    names = [f"v{i}" for i in range(channels)]
    model = build_model(
        "tiny", names, names[:1], [], embed_dim=dim, num_heads=heads, depth=1
    )  # fmt: skip
    return model.to(device)


def token_stage(
    model: Reslim, channels: int, size: int, batch: int, device: torch.device
) -> dict[str, Any]:
    """Peak memory and time of fwd + bwd through tokenizer + aggregator."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device)
    static = torch.zeros(batch, 0, size * model.cfg.mag, size * model.cfg.mag, device=device)

    def run() -> None:
        z = model.aggregator(model.tokenizer(x, static))
        z.square().mean().backward()

    sync(device)
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        run()
        sync(device)
        seconds = time.perf_counter() - start
    return {"peak_bytes": peak.bytes, "seconds": seconds, "memory_method": peak.method}


def replicated_case(
    channels: int, dim: int, heads: int, size: int, batch: int, device: str
) -> dict[str, Any]:
    """TP without D-CHAG: one rank's work (every rank does the same)."""
    torch.set_num_threads(1)
    dev = torch.device(device)
    model = build(channels, dim, heads, dev)
    res = token_stage(model, channels, size, batch, dev)
    res["params"] = sum(p.numel() for m in (model.tokenizer, model.aggregator)
                        for p in m.parameters())  # fmt: skip
    return res


def _rank(rank: int, world: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """One D-CHAG rank (inside the launcher's process group): build, apply D-CHAG, measure."""
    dev = torch.device("cuda", torch.cuda.current_device()) if kwargs["nccl"] else torch.device(
        "cpu")
    model = build(kwargs["channels"], kwargs["dim"], kwargs["heads"], dev)
    apply_dchag(model, dist.group.WORLD, kwargs["variant"])
    res = token_stage(model, kwargs["channels"], kwargs["size"], kwargs["batch"], dev)
    res["params"] = sum(p.numel() for m in (model.tokenizer, model.aggregator)
                        for p in m.parameters())  # fmt: skip
    return res


def dchag_case(world: int, **kwargs: Any) -> list[dict[str, Any]]:
    """Spawn ``world`` D-CHAG ranks with the project's launcher; each rank's measurement."""
    return spawn(_rank, world, kwargs, device="cuda" if kwargs["nccl"] else "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="D-CHAG tp sizes")
    parser.add_argument(
        "--variant", default="linear", help="linear, cross, or any variant parallel.dchag has"
    )
    parser.add_argument("--dim", type=int, default=128, help="embed_dim")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="coarse square input size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = parser.parse_args()
    dev = pick_device(args.device)
    dims = {"dim": args.dim, "heads": args.heads, "size": args.size, "batch": args.batch}

    cases, rows = [], []
    for channels in args.channels:
        base = run_isolated(replicated_case, channels=channels, device=str(dev), **dims)
        cases.append({"mode": "tp_no_dchag", "channels": channels, "ranks": [base]})
        row = {"channels": channels, "TP no D-CHAG": fmt_bytes(base["peak_bytes"])}
        for world in args.worlds:
            nccl = dev.type == "cuda" and torch.cuda.device_count() >= world
            try:
                ranks = dchag_case(
                    world, channels=channels, variant=args.variant, nccl=nccl, **dims
                )  # fmt: skip
            except (RuntimeError, ValueError) as err:
                if "variant" not in str(err) or cases[1:]:
                    raise
                # A variant this checkout's D-CHAG does not have: say so in the JSON, so the
                # figure can tell the reader why its line is missing.
                print(f"D-CHAG variant {args.variant!r} unavailable: {err}", flush=True)
                save(f"dchag_memory_{args.variant}", {"args": vars(args), "cases": [],
                     "unsupported": str(err).splitlines()[-1][:300]}, dev)  # fmt: skip
                return
            worst = max(r["peak_bytes"] for r in ranks)
            cases.append(
                {"mode": f"dchag_tp{world}", "channels": channels, "backend":
                 "nccl" if nccl else "gloo", "ranks": ranks}
            )  # fmt: skip
            row[f"D-CHAG tp={world}"] = fmt_bytes(worst)
            row[f"saving tp={world}"] = f"{100 * (1 - worst / max(base['peak_bytes'], 1)):.0f}%"
        rows.append(row)
        print(f"  C={channels} done", flush=True)
    print_table(
        rows, list(rows[0]),
        title=f"per-rank peak memory, tokenizer + aggregator fwd+bwd, D={args.dim}, coarse "
        f"{args.size}x{args.size}, batch {args.batch}, D-CHAG-{args.variant[0].upper()}, {dev} "
        f"({cases[0]['ranks'][0]['memory_method']})",
    )  # fmt: skip
    save(f"dchag_memory_{args.variant}", {"args": vars(args), "cases": cases, "table": rows}, dev)


if __name__ == "__main__":
    main()
