"""Noticing a worker that exits between steps, and saying how it exited (rank, pid, signal)."""
from __future__ import annotations

import logging
import signal
import threading
from multiprocessing.connection import wait

logger = logging.getLogger(__name__)


def watch_workers(procs: list, ranks: list[int], stopping: threading.Event, callbacks: list) -> None:
    """Notice a worker that exits while the engine is idle, when no step would notice it before the next request.
    Only waits on the sentinels (never reaps a process): the engine's thread describes the exit."""
    ready = wait([p.sentinel for p in procs])
    if stopping.is_set():
        return
    gone = ", ".join(f"rank {r} (pid {p.pid})" for r, p in zip(ranks, procs) if p.sentinel in ready)
    logger.error("worker %s exited; the engine cannot run another step", gone)
    for callback in list(callbacks):
        callback()


def describe_exit(proc) -> str:
    proc.join(0.5)
    code = proc.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
