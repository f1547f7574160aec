"""Helpers shared by the benchmark scripts: device choice, timing, peak memory, tables, JSON.

Peak memory is measured the way each device allows:

- GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
  allocated before the measured work: the tensors the work itself needed (activations,
  gradients, optimizer state), exact to the byte.
- CPU: ``tracemalloc`` does not see torch's allocator, so the measure is the rise of the process
  high-water mark ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` across the measured work. That
  is only meaningful in a FRESH process (an earlier case would already have raised the mark), so
  every case runs in its own spawned subprocess (``run_isolated``). It counts resident pages, so
  it includes allocator slack and is coarser than the GPU number; compare cases with each other,
  not with GPU figures.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from downscaler.io import write_json
from downscaler.model.presets import PRESETS
from downscaler.model.reslim import ReslimConfig

# The variables every model benchmark uses: 4 coarse inputs, 2 fine outputs, 2 fine statics.
IN_VARS, OUT_VARS, STATICS = ["t2m", "tp", "u10", "v10"], ["t2m", "tp"], ["orog", "lsm"]


def model_config(preset: str) -> ReslimConfig:
    """The benchmark variables at the size of `preset`."""
    return ReslimConfig(IN_VARS, OUT_VARS, STATICS, **PRESETS[preset])


def random_batch(
    cfg: ReslimConfig, batch: int, size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, static, y) of random values: `size x size` coarse inputs and their fine grids."""
    fine = size * cfg.mag
    x = torch.randn(batch, len(cfg.in_vars), size, size, device=device)
    static = torch.randn(batch, len(cfg.static_vars), fine, fine, device=device)
    y = torch.randn(batch, len(cfg.out_vars), fine, fine, device=device)
    return x, static, y

# The workflow's benchmark rules point this at results/benchmarks/<size>/ (BENCH_RESULTS_DIR);
# run by hand, the scripts write next to themselves.
RESULTS_DIR = Path(
    os.environ.get("BENCH_RESULTS_DIR") or Path(__file__).resolve().parent / "results"
)

__all__ = [
    "RESULTS_DIR",
    "PeakMemory",
    "fmt_bytes",
    "machine_info",
    "measured_peak",
    "software_versions",
    "pick_device",
    "print_table",
    "run_isolated",
    "sync",
    "time_fn",
    "write_results",
]


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; or exactly the device asked for."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {requested}: no CUDA device here; use --device cpu or auto")
    return device


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings measure the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any], device: torch.device, *, warmup: int = 1, repeats: int = 3
) -> dict[str, float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Returns min / median / mean; the tables report the minimum, the run least disturbed by other
    load on a shared machine (as ``timeit`` advises); the JSON keeps all three.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "mean_s": statistics.fmean(times),
        "repeats": repeats,
    }


def _maxrss_bytes() -> int:
    """This process's resident high-water mark in bytes.

    Linux: VmHWM, which, unlike ru_maxrss, a spawned process does not inherit from its parent
    (ru_maxrss survives the exec, so a child's peak would read as the larger parent's).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def memory_bandwidth(megabytes: int, repeats: int) -> float:
    """GB/s of a numpy copy (read + write counted), best of `repeats` after one warm-up."""
    src = np.ones(megabytes * 2**20 // 8, dtype="float64")
    dst = np.empty_like(src)
    best = np.inf
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


class PeakMemory:
    """Context manager: ``.bytes`` is the peak memory the enclosed work added (see module doc).

    On CPU call it in a fresh process (``run_isolated``), after building the model and inputs.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0
        self.method = (
            "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss delta"
        )

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = _maxrss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self.bytes = _maxrss_bytes() - self._start


def _isolated_entry(queue: Any, fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    try:
        queue.put(("ok", fn(**kwargs)))
    except BaseException as err:  # report any failure to the parent instead of hanging it
        queue.put(("error", f"{type(err).__name__}: {err}"))


def run_isolated(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Run module-level ``fn(**kwargs)`` in a fresh spawned process and return its result.

    A fresh process gives each case its own ``ru_maxrss`` high-water mark and a cold allocator.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_isolated_entry, args=(queue, fn, kwargs))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"benchmark case {fn.__name__}({kwargs}) failed: {value}")
    return value


def _cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on (written into every JSON result); ``label`` is the
    one line every figure prints."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            gpu_count=torch.cuda.device_count(),
            cuda=torch.version.cuda,
        )
    where = info.get("gpu") or f"{info['cpu_model']} ({info['cpu_count']} cores)"
    info["label"] = f"{info['hostname']}: {where}, torch {info['torch']}"
    return info


def measured_peak(device: torch.device, n: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """This machine's dense fp32 matmul rate, measured now (best of ``repeats``): the ceiling
    every benchmark JSON carries, so its numbers can be read against the machine that made them.
    """
    n = n or int(os.environ.get("BENCH_PEAK_N", 0)) or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    timing = time_fn(lambda: a @ b, device, warmup=2, repeats=repeats)
    return {"matmul_n": n, "dtype": "float32", "flops_per_s": 2 * n**3 / timing["min_s"]}


def software_versions() -> dict[str, str]:
    """Versions of what the numbers depend on (and the source commit, when in a git checkout)."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "snakemake", "deepspeed"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or "unknown"  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "unknown"
    return out


def fmt_bytes(n: float) -> str:
    """Human-readable bytes (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    """Print ``rows`` as a fixed-width table with ``columns`` (floats to 4 significant digits)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_results(name: str, payload: dict[str, Any], device: torch.device) -> Path:
    """Write ``payload`` plus machine info and the command line to ``results/<name>.json``.

    The results folder gets its own ``.gitignore`` (``*``): numbers are per machine, not source.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    ignore = RESULTS_DIR / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    path = RESULTS_DIR / f"{name}.json"
    doc = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(device),
        "peak": payload.pop("peak", None) or measured_peak(device),
        "versions": software_versions(),
        **payload,
    }
    write_json(json.loads(json.dumps(doc, default=str)), path)  # atomic (the project's writer)
    print(f"wrote {path}", flush=True)
    return path
