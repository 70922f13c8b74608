"""Executor: how the engine reaches its workers. The base class and its error; no executor imported here, so
every executor module imports this one at the top and nothing imports back."""
from __future__ import annotations

from collections.abc import Callable

from npu_infer.worker.step_io import StepInput, StepOutput

# The Worker methods collective_rpc may call: messages reach other nodes' workers over the network.
RPC_METHODS = frozenset({"init_kv_cache"})


class WorkerProcessError(RuntimeError):
    """A worker process died or failed: the executor cannot run another step (the server exits on it)."""


class Executor:
    """Starts the workers, which load the model and measure the KV budget; then runs the engine's steps on them.

    After __init__: num_blocks, the KV-cache blocks every rank can hold, and memory, the start-up budget that the
    engine logs."""

    num_blocks: int
    memory: dict

    def collective_rpc(self, method: str, arg: object = None) -> list:
        """Call the Worker's `method(arg)` on every rank of this node; their answers, in rank order."""
        raise NotImplementedError

    def execute(self, step: StepInput) -> StepOutput:
        """Run one step on every rank; the sampling rank's output."""
        raise NotImplementedError

    def init_kv_cache(self, num_blocks: int) -> None:
        self.collective_rpc("init_kv_cache", num_blocks)

    def register_failure_callback(self, callback: Callable[[], None]) -> None:
        """Have `callback()` called (from another thread) when a worker fails between steps; the engine's owner
        then calls check_workers() on the engine's thread. Workers in this process cannot: nothing to register."""

    def check_workers(self) -> None:
        """Raise WorkerProcessError, naming the cause, when a worker has failed."""

    def shutdown(self) -> None:
        """Stop the workers; safe to call twice."""


def check_rpc_method(method: str) -> None:
    if method not in RPC_METHODS:
        raise ValueError(f"collective_rpc cannot call {method!r}; it calls {', '.join(sorted(RPC_METHODS))}")
