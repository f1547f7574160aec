"""The GPU path in one run (`make gpu-check`): parity over NCCL/RCCL, a bf16 + SDPA step, MFU.

On a CUDA or ROCm machine (torch's "cuda" device; RCCL stands behind the nccl backend on ROCm):

1. parity: the layouts of tests/test_parallel.py (DDP, FSDP2, TP, Ulysses SP, D-CHAG; HSDP and
   the 2-D ones with 4 GPUs) on min(GPUs, 4) ranks, one GPU each, nccl backend, float64: forward,
   gradients and parameters after 3 AdamW steps against a single-process reference;
2. a Reslim training step under bf16 autocast with SDPA forced to the flash kernel (the
   memory-efficient one when flash refuses, which the table says), against the same step in
   fp32: relative loss difference and gradient cosine similarity;
3. MFU: benchmarks/bench_mfu.py's measurement (model FLOPs / step time) against this device's
   measured bf16 matmul peak.

It prints one table and exits 1 when a check fails. Without a GPU it says so and exits 0.
`--device cpu` runs the same code on CPU with gloo (how tests/test_gpu_check.py checks the
script itself on machines without a GPU).

    python benchmarks/gpu_check.py                 # what `make gpu-check` runs

It reuses the cases of tests/test_parallel.py, so it needs the test requirements (pytest):
`make gpu-check` has them; in the Frontier conda environment `pip install pytest` first.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # benchmarks/ (common, bench_mfu) and tests/

from bench_mfu import matmul_flops_per_s, measure  # noqa: E402
from common import model_config, print_table, random_batch  # noqa: E402
from downscaler.model.reslim import Reslim  # noqa: E402
from downscaler.parallel import (  # noqa: E402
    Layout,
    build_mesh,
    parallelize,
    reduce_gradients,
    shard_batch,
)
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from tests import parallel_cases as cases  # noqa: E402
from tests.test_parallel import WS2, WS4  # noqa: E402

PARITY_TOL = 1e-8      # float64; reduction order on the GPU differs from the CPU reference
BF16_LOSS_RTOL = 3e-2  # bf16 keeps 8 bits of mantissa
BF16_GRAD_COSINE = 0.99


def gpu_parity(layout: Layout, device: torch.device, steps: int = 3) -> dict:
    """tests/parallel_cases.parity with the models and batches on `device`."""
    mesh = build_mesh(layout, device.type)
    ref = cases.reference_model(layout).to(device)
    start = [p.detach().clone() for p in ref.parameters()]
    model = parallelize(cases.make_model().to(device), layout, mesh)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    worst = {"out": 0.0, "grad": 0.0, "param": 0.0}
    for step in range(steps):
        x, static, y = (t.to(device) for t in cases.make_batch(step))
        opt_ref.zero_grad()
        opt.zero_grad()
        pred_ref = ref(x, static, cases.RES_KM)
        F.mse_loss(pred_ref, y).backward()
        xl, sl, yl = shard_batch(x, static, y, layout, mesh)
        pred = model(xl, sl, cases.RES_KM)
        F.mse_loss(pred, yl).backward()
        reduce_gradients(model, layout, mesh)
        local = cases._dp_slice(layout, mesh, x.shape[0])
        worst["out"] = max(worst["out"], (pred - pred_ref[local]).abs().max().item())
        worst["grad"] = max(worst["grad"], cases._max_diff(model, ref, grads=True)[0])
        opt_ref.step()
        opt.step()
        worst["param"] = max(worst["param"], cases._max_diff(model, ref, grads=False)[0])
    worst["moved"] = max((p - s).abs().max().item()
                         for p, s in zip(ref.parameters(), start, strict=True))
    return worst


def _parity_rank(rank: int, world: int, port: int, device_type: str, table: dict, out) -> None:
    backend = "nccl" if device_type == "cuda" else "gloo"
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=300),
                                **({"device_id": device} if device_type == "cuda" else {}))
        results = {name: gpu_parity(Layout.from_config(cfg), device)
                   for name, (cfg, _checkpointing) in table.items()}
        out.put((rank, results))
        dist.barrier()
    except BaseException:
        out.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def parity_rows(device_type: str, gpus: int, only: list[str] | None = None) -> list[dict]:
    from downscaler.parallel.launch import free_port

    world = 4 if gpus >= 4 else 2 if gpus >= 2 else 1
    table = WS4 if world == 4 else WS2 if world == 2 else {"single": ({}, False)}
    if only:
        table = {name: case for name, case in table.items() if name in only}
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_parity_rank, args=(r, world, port, device_type, table, out))
             for r in range(world)]
    for p in procs:
        p.start()
    per_rank = dict(out.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    backend = "nccl" if device_type == "cuda" else "gloo"
    failed = {r: v for r, v in per_rank.items() if isinstance(v, str)}
    if failed:
        rank, tb = next(iter(failed.items()))
        return [{"check": "parity", "setting": f"{world} ranks, {backend}", "result":
                 f"rank {rank} failed: {tb.strip().splitlines()[-1]}", "status": "FAIL"}]
    rows = []
    for name in table:
        worst = {k: max(per_rank[r][name][k] for r in per_rank) for k in ("out", "grad", "param")}
        moved = min(per_rank[r][name]["moved"] for r in per_rank)
        ok = max(worst.values()) < PARITY_TOL and moved > 1e-4
        rows.append({"check": f"parity {name}", "setting": f"{world} ranks, {backend}, fp64",
                     "result": "max |diff| out {out:.1e} grad {grad:.1e} param {param:.1e}"
                     .format(**worst), "status": "ok" if ok else "FAIL"})
    return rows


def bf16_sdpa_row(device: torch.device, preset: str, size: int, batch: int) -> dict:
    """One training step in bf16 + flash SDPA against the same step in fp32."""
    cfg = model_config(preset)
    torch.manual_seed(0)
    x, static, y = random_batch(cfg, batch, size, device)

    def step(dtype: torch.dtype | None, backends: list) -> tuple[float, torch.Tensor]:
        torch.manual_seed(1)
        model = Reslim(cfg).to(device)
        with sdpa_kernel(backends), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                   enabled=dtype is not None):
            loss = F.mse_loss(model(x, static, 25.0).float(), y)
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters()
                           if p.grad is not None])
        return loss.item(), grads

    kernel = "default"
    if device.type == "cuda":
        try:
            low = step(torch.bfloat16, [SDPBackend.FLASH_ATTENTION])
            kernel = "flash"
        except RuntimeError as err:  # e.g. a head size or GPU flash does not support
            low = step(torch.bfloat16, [SDPBackend.EFFICIENT_ATTENTION])
            kernel = f"mem-efficient (flash refused: {str(err).splitlines()[0][:60]})"
    else:
        low = step(torch.bfloat16, [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
    full = step(None, [SDPBackend.MATH])
    rel = abs(low[0] - full[0]) / abs(full[0])
    cosine = F.cosine_similarity(low[1], full[1], dim=0).item()
    ok = math.isfinite(low[0]) and rel < BF16_LOSS_RTOL and cosine > BF16_GRAD_COSINE
    return {"check": "bf16 + SDPA step", "setting": f"{preset}, {size}x{size}, batch {batch}, "
            f"SDPA {kernel}", "result": f"loss rel. diff {rel:.1e}, grad cosine {cosine:.4f} "
            "vs fp32", "status": "ok" if ok else "FAIL"}


def mfu_rows(device: torch.device, presets: list[str], size: int, batch: int,
             matmul_n: int) -> list[dict]:
    peak = max(matmul_flops_per_s(matmul_n, torch.bfloat16, device, 5) for _ in range(2))
    rows = [{"check": "matmul peak", "setting": f"{matmul_n}^2 bf16",
             "result": f"{peak / 1e12:.1f} TFLOP/s measured", "status": "ok"}]
    for preset in presets:
        res = measure(preset, size, batch, torch.bfloat16, device, repeats=5)
        mfu = res["achieved_flops_per_s"] / peak
        rows.append({"check": f"MFU {preset}", "setting": f"{size}x{size}, batch {batch}, bf16",
                     "result": f"{res['step_s'] * 1e3:.1f} ms/step, "
                     f"{res['achieved_flops_per_s'] / 1e12:.2f} TFLOP/s, MFU {100 * mfu:.1f}%",
                     "status": "ok"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu"],
                        help="auto: the GPU (skip without one); cpu: the same checks on CPU")
    parser.add_argument("--presets", nargs="+", default=["9.5M", "126M"])
    parser.add_argument("--size", type=int, default=64, help="coarse input size for MFU/bf16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--layouts", nargs="+", help="only these parity cases (default: all "
                        f"of {sorted(WS2)} on 2-3 GPUs, {sorted(WS4)} on 4+)")
    args = parser.parse_args(argv)
    if args.device == "auto" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA or ROCm GPU visible to torch {torch.__version__} "
              f"(cuda {torch.version.cuda}, hip {torch.version.hip}); skipped, nothing checked")
        return 0
    device = torch.device("cuda" if args.device == "auto" else "cpu")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 2
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    runtime = f"hip {torch.version.hip}" if torch.version.hip else f"cuda {torch.version.cuda}"
    rows = parity_rows(device.type, gpus, args.layouts)
    rows.append(bf16_sdpa_row(device, args.presets[0], args.size, args.batch))
    rows += mfu_rows(device, args.presets, args.size, args.batch, args.matmul_n)
    print_table(rows, ["check", "setting", "result", "status"],
                title=f"gpu-check: {gpus} x {name}, torch {torch.__version__} ({runtime})")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
