"""Start the processes of a distributed run: under Slurm's srun, or N local processes.

Under Slurm (``srun``, one task per GPU) every task is already a rank: rank, world size, local
rank and the rendezvous (first node of the step's node list, a port derived from the job id) come
from ``SLURM_*`` variables, with the compressed node list expanded here, so neither ``torchrun``
nor ``scontrol`` is needed (OLCF discourages torchrun on Frontier). Variables set by torchrun
(``RANK``/``WORLD_SIZE``/...) are honoured too. Otherwise ``launch`` spawns ``processes`` local
processes itself (gloo on CPU, nccl -- RCCL on ROCm -- on GPU), forwards SIGTERM/SIGUSR1/SIGINT
to them and turns their exit into one result or one clear error. ``fn`` always runs inside an
initialised process group (a group of one for a single process).

This is the one launcher: the training rule (through ``train.train``), the tests and the
benchmarks start processes with ``launch`` (``fn(device, ...)``, rank 0's result) or ``spawn``
(``fn(rank, world, ...)``, every rank's result).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import re
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

#: Exit status of a run stopped by SIGTERM/SIGUSR1 after saving a resumable checkpoint:
#: EX_TEMPFAIL from sysexits.h ("try again later"). Slurm requeues on it when slurm.conf has
#: ``RequeueExit=75``; Snakemake resubmits it with ``retries`` (the Frontier profile sets it).
EXIT_REQUEUE = 75
DEFAULT_PORT = 29500
#: Seconds the other local processes get to finish after one of them failed.
FAILURE_GRACE_S = 30.0
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class LaunchError(RuntimeError):
    """The distributed environment is inconsistent or a process failed; says which and why."""


class TrainingInterrupted(SystemExit):
    """A run stopped on a signal after saving a resumable state; exits with EXIT_REQUEUE."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_REQUEUE)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the run, and how ranks meet (TCP rendezvous)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "slurm" | "torchrun" | "local"


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list, e.g. ``"frontier[00012-00014,00020],login1"``.

    Ranges keep their zero padding; several bracket groups in one name expand as a product
    (``"a[1-2]b[3-4]"`` -> a1b3, a1b4, a2b3, a2b4), as ``scontrol show hostnames`` does.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            hosts.extend(_expand_host(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"malformed Slurm node list {text!r}: unbalanced ']'")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"malformed Slurm node list {text!r}: unbalanced '['")
    parts.append(text[start:])
    return parts


def _expand_host(pattern: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    names = []
    for part in match.group(1).split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values = [bounds[0]]
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds):
            lo, hi = int(bounds[0]), int(bounds[1])
            if hi < lo:
                raise LaunchError(f"malformed Slurm node list range {part!r} in {pattern!r}")
            values = [str(v).zfill(len(bounds[0])) for v in range(lo, hi + 1)]
        else:
            raise LaunchError(f"malformed Slurm node list range {part!r} in {pattern!r}")
        names.extend(head + v for v in values)
    return [name + rest for name in names for rest in _expand_host(tail)]


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as err:
        raise LaunchError(f"environment variable {key}={env[key]!r} is not an integer") from err


def from_slurm(env: Mapping[str, str]) -> DistEnv | None:
    """The rank layout of an ``srun`` step, or None outside one.

    Only tasks started by srun count (``SLURM_STEP_NUM_TASKS`` is set): the batch script itself
    also sees ``SLURM_NTASKS`` but is a single process, and must not wait for the others.
    """
    if "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LaunchError("under srun but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST "
                          "is set; cannot find the rendezvous node")
    world = _int(env, "SLURM_STEP_NUM_TASKS")
    rank = _int(env, "SLURM_PROCID")
    if not 0 <= rank < world:
        raise LaunchError(f"SLURM_PROCID={rank} is outside SLURM_STEP_NUM_TASKS={world}")
    nodes = _int(env, "SLURM_STEP_NUM_NODES") if "SLURM_STEP_NUM_NODES" in env else None
    local_world = world // nodes if nodes else world
    if "SLURM_STEP_TASKS_PER_NODE" in env:  # e.g. "8(x4)" or "8,8,4"
        first = env["SLURM_STEP_TASKS_PER_NODE"].split(",")[0]
        local_world = int(first.split("(")[0])
    port = env.get("MASTER_PORT")
    if port is None:  # one port per job, so two jobs sharing a node do not collide
        port = DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0") or 0) % 10000
    return DistEnv(rank=rank, world_size=world, local_rank=_int(env, "SLURM_LOCALID"),
                   local_world_size=local_world, master_addr=expand_nodelist(nodelist)[0],
                   master_port=int(port), source="slurm")


def from_torchrun(env: Mapping[str, str]) -> DistEnv | None:
    """The layout given by torchrun-style variables (``RANK``, ``WORLD_SIZE``, ...), if any."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise LaunchError(f"RANK and WORLD_SIZE are set but {missing} are not; set them or unset "
                          "RANK/WORLD_SIZE to let the launcher choose")
    world = _int(env, "WORLD_SIZE")
    return DistEnv(rank=_int(env, "RANK"), world_size=world,
                   local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                   local_world_size=(_int(env, "LOCAL_WORLD_SIZE")
                                     if "LOCAL_WORLD_SIZE" in env else world),
                   master_addr=env["MASTER_ADDR"], master_port=_int(env, "MASTER_PORT"),
                   source="torchrun")


def detect(env: Mapping[str, str] | None = None) -> DistEnv | None:
    """The layout this process was started in (torchrun variables win over Slurm's)."""
    env = os.environ if env is None else env
    return from_torchrun(env) or from_slurm(env)


def resolve_device(requested: str = "auto") -> str:
    """"cuda" (also ROCm) or "cpu"; "auto" picks the GPU when there is one."""
    if requested not in ("auto", "cpu", "cuda"):
        raise LaunchError(f"config key parallel.device: {requested!r} is not auto, cpu or cuda")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise LaunchError("config key parallel.device is 'cuda' but torch sees no GPU; set it "
                          "to 'auto' or 'cpu', or install a CUDA/ROCm build of torch")
    return requested


def backend_for(device_type: str) -> str:
    """gloo on CPU; nccl on GPU (torch's ROCm build maps it to RCCL)."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_process_group(denv: DistEnv, device_type: str) -> torch.device:
    """Join the process group described by `denv`; returns this rank's device."""
    os.environ.update(MASTER_ADDR=denv.master_addr, MASTER_PORT=str(denv.master_port),
                      RANK=str(denv.rank), WORLD_SIZE=str(denv.world_size),
                      LOCAL_RANK=str(denv.local_rank))
    device = torch.device("cpu")
    if os.environ.get("MIOPEN_USER_DB_PATH"):  # node-local MIOpen cache (frontier/env.sh)
        os.makedirs(os.environ["MIOPEN_USER_DB_PATH"], exist_ok=True)
    if device_type == "cuda":
        # with --gpus-per-task=1 each task sees one GPU (index 0); otherwise pick by local rank
        device = torch.device("cuda", denv.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        dist.init_process_group(backend_for(device_type), rank=denv.rank,
                                world_size=denv.world_size, **kwargs)
    return device


def shutdown() -> None:
    """Leave the process group cleanly (a barrier first, so no rank exits mid-collective)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def free_port() -> int:
    """A TCP port that is free on this host now (for local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn: Callable[..., Any], processes: int, device: str, *args: Any) -> Any:
    """Run ``fn(device, *args)`` on every rank, inside the process group; rank 0's result.

    Inside srun/torchrun this process is one rank; otherwise ``processes`` local ranks are
    spawned (1 runs in this process, in a gloo/nccl group of one: every caller can rely on
    ``torch.distributed`` being initialised). `device` is "cpu" or "cuda".
    """
    denv = detect()
    if denv is not None:
        log.info("rank %d/%d from %s, rendezvous %s:%d", denv.rank, denv.world_size,
                 denv.source, denv.master_addr, denv.master_port)
        return _run_rank(denv, fn, device, args)
    if processes <= 1:
        single = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1,
                         master_addr="127.0.0.1", master_port=free_port(), source="local")
        return _run_rank(single, fn, device, args)
    return _spawn(fn, processes, device, args)[0]


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600.0,
          num_threads: int | None = 1, grace: float = 5.0, device: str = "cpu") -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh local processes joined in one
    process group (gloo on CPU); returns every rank's result, in rank order.

    The same processes, rendezvous and error handling as ``launch`` (for tests, benchmarks and
    anything that needs every rank's result). Raises ``LaunchError`` (a ``RuntimeError``) naming
    each failed rank and its error, or ``TimeoutError`` after ``timeout`` seconds.
    ``num_threads`` caps torch threads per process (None: torch's default).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    return _spawn(_call_with_rank, world_size, device, (fn, num_threads, args),
                  timeout=timeout, grace=grace)


def _call_with_rank(_device: torch.device, fn: Callable[..., Any], num_threads: int | None,
                    args: tuple) -> Any:
    if num_threads is not None:
        torch.set_num_threads(num_threads)  # the local processes share the cores
    return fn(dist.get_rank(), dist.get_world_size(), *args)


RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _run_rank(denv: DistEnv, fn: Callable[..., Any], device: str, args: tuple) -> Any:
    # init_process_group exports the rendezvous variables; put them back afterwards, or a later
    # launch from this process (or a child it starts) would take them as its own torchrun world
    saved = {name: os.environ.get(name) for name in RENDEZVOUS_VARIABLES}
    torch_device = init_process_group(denv, device)
    ok = False
    try:
        result = fn(torch_device, *args)
        ok = True
        return result
    finally:
        try:
            if ok:  # a failed rank skips the barrier: its peers may be stuck elsewhere
                shutdown()
            elif dist.is_initialized():
                dist.destroy_process_group()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _child(fn, rank, world, port, device, args, results) -> None:
    """Entry point of one spawned rank: run, report the result or the error, exit."""
    denv = DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                   master_addr="127.0.0.1", master_port=port, source="local")
    try:
        result = _run_rank(denv, fn, device, args)
        # by value: torch's queue pickler would pass tensors as shared-memory handles, which
        # die with this process
        results.put(("ok", rank, pickle.dumps(result)))
    except TrainingInterrupted as stop:
        results.put(("interrupted", rank, str(stop)))
        sys.exit(EXIT_REQUEUE)
    except BaseException as err:  # report any failure to the parent, then exit non-zero
        traceback.print_exc()
        results.put(("error", rank, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
        sys.exit(1)


def _spawn(fn: Callable[..., Any], processes: int, device: str, args: tuple,
           timeout: float | None = None, grace: float = FAILURE_GRACE_S) -> list[Any]:
    """Every rank's result (rank order) of ``fn(device, *args)`` on local processes."""
    if device == "cuda" and torch.cuda.device_count() < processes:
        raise LaunchError(f"config key parallel.processes={processes} but only "
                          f"{torch.cuda.device_count()} GPU(s) are visible; lower it")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, processes, port, device, args, results),
                         name=f"rank{r}") for r in range(processes)]
    previous = {}

    def forward(signum, _frame):  # pass the scheduler's signal on; the ranks save and exit
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, signum)

    for signum in FORWARDED_SIGNALS:
        previous[signum] = signal.signal(signum, forward)
    # Spawned children must not inherit a half-set distributed environment from the parent.
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    messages: list[tuple] = []
    try:
        for p in procs:
            p.start()
        os.environ.update(saved)
        _wait_all(procs, results, messages, timeout, grace)
    finally:
        os.environ.update(saved)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                p.kill()
                p.join()
    while not results.empty():
        messages.append(results.get())
    errors = sorted((m for m in messages if m[0] == "error"), key=lambda m: m[1])
    if errors:
        detail = "\n".join(f"--- rank {rank}: {msg}" for _, rank, msg in errors)
        raise LaunchError(f"{len(errors)} of {processes} processes failed "
                          f"(rank {', '.join(str(m[1]) for m in errors)}):\n{detail}")
    codes = {p.name: p.exitcode for p in procs}
    if any(code == EXIT_REQUEUE for code in codes.values()):
        stops = [m[2] for m in messages if m[0] == "interrupted"]
        raise TrainingInterrupted(stops[0] if stops else "training interrupted by a signal")
    if any(codes.values()):
        raise LaunchError(f"local processes exited abnormally: {codes} (negative = killed by "
                          "that signal); see logs/train/rank*.log")
    ok = {m[1]: pickle.loads(m[2]) for m in messages if m[0] == "ok"}
    return [ok.get(r) for r in range(processes)]


def _wait_all(procs: list, results: Any, messages: list, timeout: float | None,
              grace: float) -> None:
    """Wait for every process while collecting their messages (a full pipe would otherwise
    block a finishing rank); once one fails, give the rest ``grace`` seconds, then kill them."""
    pending = {p.sentinel: p for p in procs}
    reader = results._reader
    deadline = None
    limit = None if timeout is None else _now() + timeout
    while pending:
        ends = [t for t in (deadline, limit) if t is not None]
        wait = None if not ends else max(0.0, min(ends) - _now())
        ready = mp.connection.wait([*pending, reader], timeout=wait)
        if reader in ready:
            while not results.empty():
                messages.append(results.get())
            continue
        if not ready:
            if limit is not None and _now() >= limit:
                for p in pending.values():
                    p.kill()
                raise TimeoutError(f"local processes did not finish within {timeout:.0f} s; "
                                   f"still running: {sorted(p.name for p in pending.values())}")
            # grace period over: the survivors are stuck in a collective
            for p in pending.values():
                p.kill()
            deadline = _now() + 3600  # wait for the kills to land
            continue
        for sentinel in ready:
            p = pending.pop(sentinel)
            p.join()
            if p.exitcode not in (0, EXIT_REQUEUE) and deadline is None:
                deadline = _now() + grace


def _now() -> float:
    return time.monotonic()
