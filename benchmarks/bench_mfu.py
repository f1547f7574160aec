"""Model FLOP utilisation (MFU) of a Reslim training step, per preset.

MFU = (model FLOPs of one training step / its time) / (this machine's matmul FLOP/s).

- Model FLOPs: counted with ``torch.utils.flop_counter.FlopCounterMode`` over one forward +
  backward, with attention forced to the MATH backend for the counting pass only (the fused CPU
  / flash kernels are opaque to the counter, the math one is plain matmuls). These are model
  FLOPs: matmuls and convolutions, no recomputation, no element-wise work.
- Step time: forward + backward + AdamW with the default attention kernels (what training runs).
- Peak: a large square matmul of the same dtype timed in the same run (``--matmul-n``), i.e.
  the machine's attainable dense-matmul rate, not a datasheet number.

    python benchmarks/bench_mfu.py                                       # CPU defaults
    python benchmarks/bench_mfu.py --presets 9.5M 126M --size 64 --batch 16 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from common import model_config, pick_device, print_table, random_batch, sync, time_fn
from common import write_results as save
from downscaler.model.presets import PRESETS
from downscaler.model.reslim import Reslim
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matmul_flops_per_s(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """Measured dense matmul rate: ``2 n^3`` FLOPs per ``[n, n] @ [n, n]``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = time_fn(lambda: a @ b, device, warmup=2, repeats=repeats)
    return 2 * n**3 / timing["min_s"]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked (as ORBIT-2 trains), else nothing."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def measure(
    preset: str, size: int, batch: int, dtype: torch.dtype, device: torch.device, repeats: int
) -> dict[str, Any]:
    """FLOPs and time of one training step of ``preset`` on ``size x size`` coarse inputs."""
    torch.manual_seed(0)
    cfg = model_config(preset)
    model = Reslim(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    x, static, y = random_batch(cfg, batch, size, device)

    def fwd_bwd() -> None:
        with autocast(device, dtype):
            loss = F.mse_loss(model(x, static, 25.0), y)
        loss.backward()

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fwd_bwd()
    flops = counter.get_total_flops()
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        fwd_bwd()
        opt.step()

    timing = time_fn(step, device, warmup=2, repeats=repeats)
    sync(device)
    return {
        "preset": preset,
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_step": flops,
        "flops_by_op": by_op,
        "step_s": timing["min_s"],
        "samples_per_s": batch / timing["min_s"],
        "tokens_per_s": batch * (size // cfg.patch_size) ** 2 / timing["min_s"],
        "batch": batch,
        "timing": timing,
        "achieved_flops_per_s": flops / timing["min_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "9.5M"], choices=sorted(PRESETS))
    parser.add_argument("--size", type=int, default=32, help="coarse square input size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--matmul-n", type=int, help="peak matmul size (default 2048 CPU, 8192 GPU)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    dtype = DTYPES[args.dtype]
    n = args.matmul_n or (8192 if dev.type == "cuda" else 2048)

    # The peak is taken before and after the model runs and the best kept: on a shared machine
    # a single measurement can land in a busy moment and overstate the MFU.
    peaks = [matmul_flops_per_s(n, dtype, dev, max(5, args.repeats))]
    cases = [measure(p, args.size, args.batch, dtype, dev, args.repeats) for p in args.presets]
    peaks.append(matmul_flops_per_s(n, dtype, dev, max(5, args.repeats)))
    peak = max(peaks)
    print(f"peak: {n}x{n} {args.dtype} matmul = {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows = []
    for res in cases:
        res["mfu"] = res["achieved_flops_per_s"] / peak
        preset = res["preset"]
        rows.append(
            {
                "preset": preset,
                "params": f"{res['params'] / 1e6:.2f}M",
                "GFLOP/step": res["flops_per_step"] / 1e9,
                "step s": res["step_s"],
                "samples/s": res["samples_per_s"],
                "tokens/s": res["tokens_per_s"],
                "GFLOP/s": res["achieved_flops_per_s"] / 1e9,
                "peak GFLOP/s": peak / 1e9,
                "MFU %": 100 * res["mfu"],
            }
        )
    print_table(
        rows, list(rows[0]),
        title=f"training step (fwd+bwd+AdamW), coarse {args.size}x{args.size}, batch "
        f"{args.batch}, {args.dtype}, {dev}",
    )  # fmt: skip
    save(
        "mfu",
        {
            "args": vars(args),
            "peak_matmul": {"n": n, "flops_per_s": peak, "measurements": peaks},
            "peak": {"matmul_n": n, "dtype": args.dtype, "flops_per_s": peak},
            "cases": cases,
        },
        dev,
    )


if __name__ == "__main__":
    main()
