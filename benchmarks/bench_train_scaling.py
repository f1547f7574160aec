"""Strong and weak scaling of a data-parallel Reslim training step over local processes.

Every process count runs in fresh processes started by the project's launcher
(``downscaler.launcher.spawn``: gloo on CPU, one thread per process so the processes share the
cores, nccl when there is one GPU per rank). A step is forward + backward + DDP gradient
all-reduce + AdamW; the step time is the slowest rank's (minimum over ``--repeats``).

- strong: the global batch ``--batch`` is split over the processes;
  efficiency = t(1) / (n t(n)) in samples per second per process.
- weak: every process keeps ``--batch`` samples; efficiency = t(1) / t(n).

    python benchmarks/bench_train_scaling.py                             # CPU defaults
    python benchmarks/bench_train_scaling.py --preset 9.5M --size 32 --batch 8 --processes 1 2 4
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import model_config, pick_device, print_table, random_batch
from common import write_results as save
from downscaler.launcher import launch, spawn
from downscaler.model.presets import PRESETS
from downscaler.model.reslim import Reslim
from torch.nn.parallel import DistributedDataParallel


def _rank(rank: int, world: int, kw: dict[str, Any]) -> list[float]:
    """This rank's step times (seconds) for ``kw['per_rank']`` samples."""
    cuda = kw["device"] == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    cfg = model_config(kw["preset"])
    model = DistributedDataParallel(Reslim(cfg).to(dev))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    torch.manual_seed(rank)
    x, static, y = random_batch(cfg, kw["per_rank"], kw["size"], dev)
    times = []
    for i in range(kw["repeats"] + 1):  # the first step warms up
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x, static, 25.0), y).backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(dev)
        if i:
            times.append(time.perf_counter() - start)
    return times


def _single(_device: torch.device, kw: dict[str, Any]) -> list[float]:
    return _rank(0, 1, kw)


def step_time(world: int, **kw: Any) -> float:
    """The slowest rank's time per step, best over the repeats (one process runs here, in a
    group of one, with the same one thread per process as the spawned ranks)."""
    if world == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            per_rank = [launch(_single, 1, kw["device"], kw)]
        finally:
            torch.set_num_threads(threads)
    else:
        per_rank = spawn(_rank, world, kw, device=kw["device"])
    return min(max(step) for step in zip(*per_rank, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--size", type=int, default=16, help="coarse square input size")
    parser.add_argument("--batch", type=int, default=4, help="global (strong) / per rank (weak)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = parser.parse_args()
    dev = pick_device(args.device)
    if dev.type == "cuda" and max(args.processes) > torch.cuda.device_count():
        dev = torch.device("cpu")  # one GPU per rank or none
    common = {"preset": args.preset, "size": args.size, "repeats": args.repeats,
              "device": dev.type}  # fmt: skip
    cases: list[dict[str, Any]] = []
    measured: dict[tuple[int, int], float] = {}  # strong and weak share the 1-process run
    for mode in ("strong", "weak"):
        base = None
        for n in args.processes:
            if mode == "strong" and args.batch % n:
                print(f"  strong n={n}: skipped, --batch {args.batch} not divisible", flush=True)
                continue
            per_rank = args.batch // n if mode == "strong" else args.batch
            if (n, per_rank) not in measured:
                measured[n, per_rank] = step_time(n, per_rank=per_rank, **common)
            seconds = measured[n, per_rank]
            global_batch = per_rank * n
            base = base or (n, seconds)
            eff = base[1] * base[0] / (n * seconds) if mode == "strong" else base[1] / seconds
            cases.append({
                "mode": mode, "processes": n, "per_rank_batch": per_rank,
                "global_batch": global_batch, "step_s": seconds,
                "samples_per_s": global_batch / seconds, "efficiency": eff,
            })  # fmt: skip
            print(f"  {mode} n={n}: {seconds:.4g} s/step, efficiency {eff:.2f}", flush=True)
    print_table(
        cases, list(cases[0]),
        title=f"DDP training step, preset {args.preset}, coarse {args.size}x{args.size}, {dev}",
    )  # fmt: skip
    save("train_scaling", {"args": vars(args), "cases": cases}, dev)


if __name__ == "__main__":
    main()
