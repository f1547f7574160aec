"""Stopping the workflow asks a running training to save and stop.

Snakemake 9 does not pass a stop on to the jobs it runs locally: on SIGTERM it only stops
scheduling and waits for the running jobs to finish ("graceful"); on SIGINT (Ctrl-C) it cancels
its thread pool, which also waits for them. Only a Ctrl-C typed in a terminal reaches the jobs,
because the terminal signals the whole foreground process group. A training run can take hours,
so the Snakefile's ``onstart`` hook calls ``forward_stop_to_training``: on SIGTERM or SIGINT
Snakemake's own handler still runs, and every local ``python -m downscaler.cli train`` below
this process gets SIGTERM first. The training saves its resumable state and exits 75, the rule
fails with that state kept (``results/model/train_state/`` is not a rule output), and the next
run resumes from it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable

#: what the workflow gets when a user stops it: kill, or Ctrl-C
WORKFLOW_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def is_training_command(argv: Iterable[str]) -> bool:
    """Whether a process's argument vector is ``... -m downscaler.cli train ...``.

    Arguments are compared one by one, so the ``bash -c "... downscaler.cli train ..."`` that
    Snakemake wraps around the rule never matches: killing it would orphan the training.
    """
    args = list(argv)
    return any(args[i:i + 3] == ["-m", "downscaler.cli", "train"] for i in range(len(args)))


def training_processes(root_pid: int | None = None) -> list[int]:
    """Process ids of the training commands among the descendants of ``root_pid`` (this one)."""
    import psutil  # a Snakemake dependency, so always there when a Snakefile runs

    found = []
    for child in psutil.Process(root_pid or os.getpid()).children(recursive=True):
        try:
            if is_training_command(child.cmdline()):
                found.append(child.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def ask_training_to_stop(root_pid: int | None = None) -> list[int]:
    """Send SIGTERM to each local training below ``root_pid``; the pids signalled."""
    signalled = []
    for pid in training_processes(root_pid):
        try:
            os.kill(pid, signal.SIGTERM)  # the launcher passes it on to every rank
            signalled.append(pid)
        except ProcessLookupError:
            continue
    return signalled


def _chained(previous: Callable | int | None, signum: int) -> Callable:
    def handler(sig, frame):
        ask_training_to_stop()
        if callable(previous):
            previous(sig, frame)
        elif previous == signal.SIG_DFL:
            if signum == signal.SIGINT:
                signal.default_int_handler(sig, frame)
            signal.signal(signum, signal.SIG_DFL)  # what the process would have done
            os.kill(os.getpid(), signum)

    return handler


def forward_stop_to_training() -> None:
    """Chain onto this process's SIGTERM/SIGINT handlers (call after Snakemake installed its
    own, i.e. from ``onstart``): first ask local trainings to save and stop, then do what the
    previous handler did. Ignored signals stay ignored."""
    for signum in WORKFLOW_STOP_SIGNALS:
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN:
            continue
        signal.signal(signum, _chained(previous, signum))
