"""Where dask computations run, and a progress bar while they do.

`regrid.scheduler` in config picks the scheduler for the preprocessing stages:
  threads       (default) the local threaded scheduler: numpy releases the GIL, no copies,
  synchronous   one thread, for debugging and for the tightest memory bound,
  processes     local processes, for GIL-bound work,
  tcp://host:port  a running dask.distributed scheduler (HPC: `dask scheduler` + workers started
                by the batch job); `distributed` is imported only then.
Wrap the work in `with dask_scheduler(name):` and run graphs through `compute(...)`: it shows
dask's ProgressBar locally, or distributed's progress on a cluster.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import dask

LOCAL_SCHEDULERS = ("threads", "synchronous", "processes")
_progress_enabled: list[bool] = [False]  # the innermost dask_scheduler's `progress` setting


def check_scheduler(scheduler: str) -> str:
    """Validate a `regrid.scheduler` value; return 'local' or 'distributed'."""
    if scheduler in LOCAL_SCHEDULERS:
        return "local"
    if isinstance(scheduler, str) and scheduler.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        return "distributed"
    raise ValueError(
        f"regrid.scheduler must be one of {LOCAL_SCHEDULERS} or a dask.distributed scheduler "
        f"address like 'tcp://host:8786', got {scheduler!r}"
    )


def _connect(address: str):
    try:
        from distributed import Client
    except ImportError as err:
        raise ImportError(
            f"regrid.scheduler {address!r} needs dask.distributed: pip install 'distributed' "
            "(same version as dask), or set regrid.scheduler to 'threads'"
        ) from err
    try:
        return Client(address, timeout="30s")
    except OSError as err:
        raise RuntimeError(
            f"cannot reach the dask scheduler at {address!r} (regrid.scheduler): {err}. "
            "Start it (dask scheduler; dask worker ADDRESS) or set regrid.scheduler to 'threads'"
        ) from err


@contextlib.contextmanager
def dask_scheduler(
    scheduler: str = "threads", progress: bool = True, num_workers: int | None = None
) -> Iterator[Any]:
    """Run the dask work inside the block on `scheduler`; yields the distributed Client or None.

    `progress` makes `compute` (and any dask computation, locally) show a progress bar on
    stderr, which ends up in the rule's log file. `num_workers` caps local threads/processes.
    """
    kind = check_scheduler(scheduler)
    _progress_enabled.append(progress)
    try:
        if kind == "distributed":
            with _connect(scheduler) as client:
                yield client
            return
        settings: dict[str, Any] = {"scheduler": scheduler}
        if num_workers is not None:
            settings["num_workers"] = num_workers
        with dask.config.set(settings), _local_progress(progress):
            yield None
    finally:
        _progress_enabled.pop()


def _local_progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    from dask.diagnostics import ProgressBar

    # a slow refresh keeps log files short; minimum skips the bar for instant graphs
    return ProgressBar(minimum=1.0, dt=1.0, out=sys.stderr)


def _active_client():
    if "distributed" not in sys.modules:  # never import distributed just to look
        return None
    from distributed import get_client

    try:
        return get_client()
    except ValueError:  # no client in this process
        return None


def compute(*collections: Any) -> tuple:
    """`dask.compute` on the active scheduler, sharing one graph (each input chunk read once).

    On a distributed cluster the graph is submitted as futures and distributed's text progress
    bar follows them; locally dask's ProgressBar (from `dask_scheduler`) does.
    """
    client = _active_client()
    if client is None:
        return dask.compute(*collections)
    futures = client.compute(list(collections))
    if _progress_enabled[-1]:
        from distributed import progress

        progress(futures)
    return tuple(client.gather(futures))


def store_netcdf(ds: Any, path: Any) -> None:
    """Write a (dask-backed) Dataset to netCDF chunk by chunk on the active scheduler.

    Locally `to_netcdf` computes its own store graph (memory stays at a few chunks; computing
    the `compute=False` delayed instead held the whole input in memory with dask 2026.8);
    on a cluster the delayed goes through `compute` so distributed's progress bar shows.
    """
    if _active_client() is None:
        ds.to_netcdf(path)
    else:
        compute(ds.to_netcdf(path, compute=False))
