"""Executor: how the engine reaches its workers. The executors' error; no executor imported here, so every executor
module imports this one at the top and nothing imports back."""
from __future__ import annotations


class WorkerProcessError(RuntimeError):
    """A worker process died or failed: the executor cannot run another step (the server exits on it)."""
