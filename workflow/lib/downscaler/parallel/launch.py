"""Spawn N local processes joined in a gloo process group (for tests and CPU benchmarks).

``spawn(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in each process on
127.0.0.1 with a free port, returns the per-rank results, and re-raises any failure naming the
rank(s) with their tracebacks. Every process always leaves the process group: ranks that
succeeded meet at a barrier first (so none exits while another still talks to it); a failed rank
skips the barrier (its peers may be stuck in a collective it never joins) and the parent stops
the remaining processes after a short grace period. ``fn`` must be importable at module level
(it is pickled into the spawned interpreters).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["free_port", "spawn"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
    num_threads: int | None,
    timeout_s: float,
) -> None:
    """Body of one spawned process: join the group, run ``fn``, report, always leave."""
    import torch
    import torch.distributed as dist

    if num_threads is not None:
        torch.set_num_threads(num_threads)  # N processes share the cores
    ok = False
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        out = fn(rank, world_size, *args)
        ok = True
        results.put((rank, True, out))
    except BaseException:  # report everything, including KeyboardInterrupt, with the rank
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 600.0,
    num_threads: int | None = 1,
    grace: float = 5.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh gloo processes.

    Returns ``[result of rank 0, rank 1, ...]`` (results must pickle). Raises ``RuntimeError``
    naming every failed rank with its traceback, or ``TimeoutError`` after ``timeout`` seconds.
    ``num_threads`` caps torch threads per process (``None``: torch's default).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, results, num_threads, timeout),
            name=f"downscaler-rank{rank}",
        )
        for rank in range(world_size)
    ]
    # Spawned children must not inherit a half-set distributed environment from the parent.
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        for p in procs:
            p.start()
    finally:
        os.environ.update(saved)
    outputs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    first_failure: float | None = None
    try:
        while len(outputs) + len(failures) < world_size:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(
                    f"spawn({getattr(fn, '__name__', fn)}, {world_size}) did not finish within "
                    f"{timeout:.0f} s; ranks still running: "
                    f"{sorted(set(range(world_size)) - outputs.keys() - failures.keys())}"
                )
            if first_failure is not None and now - first_failure > grace:
                break  # peers of a failed rank are usually stuck in a collective
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                # A rank that reported always exits 0; a non-zero code means it died silently
                # (segfault, os._exit, killed) and will never report.
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and r not in outputs and r not in failures
                ]
                for r in dead:
                    failures[r] = f"process exited with code {procs[r].exitcode} without a result"
                    first_failure = first_failure or time.monotonic()
                continue
            if ok:
                outputs[rank] = payload
            else:
                failures[rank] = payload
                first_failure = first_failure or time.monotonic()
    finally:
        for p in procs:
            p.join(timeout=grace if not failures else 1.0)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
        results.close()
    if failures:
        report = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(failures.items()))
        raise RuntimeError(
            f"{len(failures)} of {world_size} rank(s) failed ({sorted(failures)}):\n{report}"
        )
    return [outputs[r] for r in range(world_size)]
