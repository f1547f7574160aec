"""What a training run writes about itself: per-rank log files and the metrics CSV.

``setup_logging`` gives every rank its own ``rank<N>.log`` (rank 0 also logs to stderr, the
rule's log). ``MetricsLog`` is rank 0's metrics CSV (``LOG_FIELDS``; the figures read the first
five columns) with optional TensorBoard scalars; on resume it keeps the rows up to the resumed
step, so a validation is never listed twice.
"""

from __future__ import annotations

import csv
import logging
import resource
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["LOG_FIELDS", "MetricsLog", "memory_mb", "setup_logging", "teardown_logging"]

# The figures read the first five columns; the rest are throughput and memory of rank 0, the
# gradient norm before clipping, and a note (e.g. "not converged").
LOG_FIELDS = ["step", "epoch", "train_loss", "val_loss", "lr", "samples_per_s", "tokens_per_s",
              "memory_mb", "grad_norm", "note"]


def setup_logging(log: logging.Logger, log_dir: str, rank: int) -> logging.Handler:
    """One log file per rank; rank 0 also logs to stderr (the rule's log)."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(log_dir) / f"rank{rank}.log", mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s rank" + str(rank) + " %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if rank == 0:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(message)s"))
        handler.stream_handler = stream  # type: ignore[attr-defined]
        log.addHandler(stream)
    return handler


def teardown_logging(log: logging.Logger, handler: logging.Handler) -> None:
    for h in (handler, getattr(handler, "stream_handler", None)):
        if h is not None:
            log.removeHandler(h)
            h.close()


def memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: GPU allocations on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MetricsLog:
    """The metrics CSV at ``path`` (and TensorBoard beside it when installed)."""

    def __init__(self, path: Path, resumed_step: int | None) -> None:
        rows = []
        if resumed_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resumed_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=LOG_FIELDS)
        self._writer.writeheader()
        self._writer.writerows({k: r.get(k, "") for k in LOG_FIELDS} for r in rows)
        self._file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard: Any = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tensorboard = None

    def write(self, row: dict) -> None:
        self._writer.writerow({k: row.get(k, "") for k in LOG_FIELDS})
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "epoch", "note") and value != "":
                    self._tensorboard.add_scalar(key, float(value), row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
