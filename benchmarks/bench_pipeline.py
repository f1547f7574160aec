"""Pipeline bubble: the measured idle fraction of a pipeline step vs (stages p, micro-batches m),
against the theory (p-1)/(m+p-1), for GPipe and 1F1B (``torch.distributed.pipelining``, the
schedules the training engine uses under ``parallel.pp``).

Each stage is one local process (gloo) holding a small linear layer whose forward and backward
each also spend a fixed time (``--forward-ms``, backward twice that, as for a transformer) in a
sleep: the compute of a stage is simulated so that 4 stages fit on 2 cores without contending
for them, while the schedule, the micro-batching and the point-to-point sends are the real ones.
A step starts on all stages after a barrier and ends when the last stage finishes; a stage's
bubble is the part of that step it spent outside its forward and backward work, and the table
reports the mean over the stages (the median over ``--repeats`` steps). The excess over theory
is the schedule's own overhead (Python, sends, loss) per step.

JSON (``benchmarks/results/pipeline.json``), besides ``args``/``machine``/``command``:

- ``rows``: one per (schedule, stages, micro-batches) with ``schedule``, ``stages``,
  ``microbatches``, ``step_s`` (median), ``busy_s`` (per stage, mean), ``bubble`` (measured),
  ``theory``, ``excess`` (measured - theory), or ``skipped`` with torch's reason;
- ``table``: the printed rows.

Usage (about a minute on 2 CPU cores)::

    python benchmarks/bench_pipeline.py
    python benchmarks/bench_pipeline.py --stages 2 4 --microbatches 1 2 4 8 --forward-ms 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import pick_device, print_table, write_results
from downscaler.launcher import spawn
from downscaler.parallel.pipeline import make_schedule
from torch import nn
from torch.distributed.pipelining import PipelineStage


class _Work(torch.autograd.Function):
    """Identity that spends ``t_f`` seconds in forward and ``t_b`` in backward (the stage's
    simulated compute), recording the time actually spent in ``busy``."""

    @staticmethod
    def forward(ctx, x, t_f, t_b, busy):  # noqa: D102
        ctx.t_b, ctx.busy = t_b, busy
        _spend(t_f, busy)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        _spend(ctx.t_b, ctx.busy)
        return grad, None, None, None


def _spend(seconds: float, busy: list[float]) -> None:
    start = time.perf_counter()
    time.sleep(seconds)
    busy.append(time.perf_counter() - start)


class Stage(nn.Module):
    """A linear layer (something to train) and the simulated compute."""

    def __init__(self, dim: int, t_f: float, t_b: float) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.t_f, self.t_b, self.busy = t_f, t_b, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return _Work.apply(self.linear(x), self.t_f, self.t_b, self.busy)


def measure_rank(rank: int, world: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    """On this stage: per (schedule, micro-batches), the step times and this stage's busy time."""
    t_f = args["forward_ms"] / 1000
    out = []
    for schedule in args["schedules"]:
        for m in args["microbatches"]:
            torch.manual_seed(0)
            module = Stage(args["dim"], t_f, 2 * t_f)
            stage = PipelineStage(module, rank, world, torch.device("cpu"))
            try:
                pipe = make_schedule(stage, schedule, m, F.mse_loss)
            except ValueError as err:  # e.g. 1F1B with fewer micro-batches than stages
                out.append({"schedule": schedule, "microbatches": m, "skipped": str(err)})
                continue
            g = torch.Generator().manual_seed(1)
            x = torch.randn(m * args["microbatch_size"], args["dim"], generator=g)
            y = torch.randn_like(x)
            steps, busy = [], []
            for i in range(args["repeats"] + 1):  # the first step is a warm-up
                module.busy.clear()
                dist.barrier()
                start = time.perf_counter()
                pipe.step(*((x,) if rank == 0 else ()), target=y if rank == world - 1 else None)
                end = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(end, op=dist.ReduceOp.MAX)  # the step ends with the last stage
                if i:
                    steps.append(end.item())
                    busy.append(sum(module.busy))
            out.append({"schedule": schedule, "microbatches": m, "steps": steps, "busy": busy})
    return out


def summarise(ranks: list[list[dict]], p: int) -> list[dict[str, Any]]:
    """The rows of one stage count from every stage's measurements."""
    rows = []
    for cases in zip(*ranks, strict=True):
        first = cases[0]
        row = {"schedule": first["schedule"], "stages": p, "microbatches": first["microbatches"],
               "theory": (p - 1) / (first["microbatches"] + p - 1)}
        if "skipped" in first:
            rows.append({**row, "skipped": first["skipped"]})
            continue
        # per repeat: the mean over stages of the idle share of the common step
        bubbles = [statistics.mean(1 - c["busy"][i] / c["steps"][i] for c in cases)
                   for i in range(len(first["steps"]))]
        row.update(step_s=statistics.median(first["steps"]),
                   busy_s=statistics.mean(statistics.median(c["busy"]) for c in cases),
                   bubble=statistics.median(bubbles))
        row["excess"] = row["bubble"] - row["theory"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"],
                        choices=["gpipe", "1f1b"])
    parser.add_argument("--forward-ms", type=float, default=10.0,
                        help="simulated forward time per micro-batch and stage (backward: 2x)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--microbatch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    opts = vars(args)
    rows, table = [], []
    for p in args.stages:
        rows += summarise(spawn(measure_rank, p, opts, timeout=600), p)
    for r in rows:
        table.append({"schedule": r["schedule"], "p": r["stages"], "m": r["microbatches"],
                      "theory": r["theory"], "measured": r.get("bubble", "skipped"),
                      "excess": r.get("excess", ""),
                      "step ms": 1000 * r["step_s"] if "step_s" in r else ""})
    print_table(table, list(table[0]),
                title=f"pipeline bubble, (p-1)/(m+p-1) vs measured; forward {args.forward_ms:g} "
                f"ms + backward {2 * args.forward_ms:g} ms per micro-batch and stage (simulated), "
                "gloo on local processes")
    write_results("pipeline", {"args": opts, "rows": rows, "table": table}, pick_device("cpu"))


if __name__ == "__main__":
    main()
