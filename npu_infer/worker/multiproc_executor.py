"""MultiprocExecutor: one spawned process per TP/PP rank; each step goes down a pipe to every rank of this node.

The engine's process is not a rank. It encodes each step once (pickle on one node; JSON of known types when
other nodes take part, so nothing from the network is unpickled) and writes it to one pipe per local rank
(0.1-0.3 ms for 2-4 ranks here, against 0.6-2 ms for a gloo broadcast from rank 0), then waits on the pipe
of the rank that samples (last pipeline stage, tensor-parallel rank 0) together with every worker's pipe and
process sentinel, so a worker that raises or dies ends the wait at once with a WorkerProcessError (a
RuntimeError; the server exits on it). Keeping torch.distributed out of the engine's process also means the
engine never blocks inside a collective.

Multi-node: ranks on other nodes are started by `npu-infer worker` (worker_cli.py). They have no pipe to
the engine: rank 0 forwards each step to them with a gloo broadcast, and when the sampling rank lives on
another node it sends the step's output to rank 0, which hands it to the engine.

The rest lives beside this file: parallel_layout.py (which ranks run where), worker_process.py (a rank's loop),
node_messages.py (the message encoding), watchdog.py (a worker that exits between steps).
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

from npu_infer import envs
from npu_infer.config import EngineConfig
from npu_infer.worker.executor_base import Executor, WorkerProcessError, check_rpc_method
from npu_infer.worker.node_messages import message_encoder
from npu_infer.worker.parallel_layout import check_parallel_config, output_rank, ranks_of_node, rendezvous_address
from npu_infer.worker.step_io import StepInput, StepOutput
from npu_infer.worker.watchdog import describe_exit, watch_workers
from npu_infer.worker.worker_process import for_workers, spawn_workers, stop_workers

logger = logging.getLogger(__name__)

_POLL_S = 1.0


class MultiprocExecutor(Executor):
    """Spawns this node's ranks, hands every step to all of them, returns the sampling rank's StepOutput."""

    def __init__(self, config: EngineConfig):
        check_parallel_config(config)
        if config.node_rank != 0:
            raise ValueError(f"the engine runs on node 0; on node {config.node_rank} run `npu-infer worker` "
                             "with the same flags")
        self.config = config
        # Limit on one step (seconds): a rank that stops answering (hung collective, SIGSTOP) ends the wait with a
        # WorkerProcessError; 0 waits as long as the step takes, still watching for deaths.
        timeout = envs.NPU_INFER_STEP_TIMEOUT
        self.step_timeout = config.step_timeout if timeout is None else timeout
        self.local_ranks = list(ranks_of_node(config, 0))
        self.procs, self.conns = spawn_workers(for_workers(config), 0,
                                               rendezvous_address(config), with_pipes=True)
        self._stopping = threading.Event()  # set before the executor stops its workers itself
        self._encode = message_encoder(config)
        self._finalizer = weakref.finalize(self, _stop_all, self._stopping, self.procs, self.conns, self._encode)
        self._on_failure: list = []
        logger.info("worker processes: %s", ", ".join(f"rank {r} pid {p.pid}" for r, p in zip(self.local_ranks,
                                                                                          self.procs)))
        self._broken: str | None = None
        out = output_rank(config)
        self._output_conn = self.conns[out] if out in self.local_ranks else self.conns[0]
        answers = list(self._wait(self.conns, "start").values())
        self.num_blocks = answers[0]["num_blocks"]  # the minimum over every rank (all-reduced by the workers)
        # The start-up log shows the budget of the most constrained local rank, the one whose count is used.
        self.memory = dict(min((a["memory"] for a in answers), key=lambda m: m["num_blocks"]),
                           num_blocks=self.num_blocks)
        threading.Thread(target=watch_workers, name="npu-infer-worker-watch", daemon=True,
                         args=(self.procs, self.local_ranks, self._stopping, self._on_failure)).start()
        logger.info("%d worker processes ready (tp=%d, pp=%d, nnodes=%d); KV blocks per rank: %d",
                    len(self.procs), config.tensor_parallel_size, config.pipeline_parallel_size, config.nnodes,
                    self.num_blocks)

    def collective_rpc(self, method: str, arg: object = None) -> list:
        check_rpc_method(method)
        self._send(method, arg)
        answers = self._wait(self.conns, method)
        return [answers[conn] for conn in self.conns]

    def execute(self, step: StepInput) -> StepOutput:
        self._send("execute", step.with_masks_built())
        return self._wait([self._output_conn], "execute", self.step_timeout)[self._output_conn]

    def ping(self, payload: object = None) -> None:
        """Send `payload` (e.g. a StepInput) to every rank and wait for the sampling rank's answer, running no
        model: what the message path alone costs per step (benchmarks/parallel_overhead.py)."""
        self._send("ping", payload)
        self._wait([self._output_conn], "ping")

    def shutdown(self) -> None:
        self._finalizer()  # runs _stop once; later calls do nothing

    def register_failure_callback(self, callback: Callable[[], None]) -> None:
        self._on_failure.append(callback)  # called by watch_workers when a worker exits between steps

    def check_workers(self) -> None:
        if self._broken:
            raise WorkerProcessError(self._broken)
        errors = []
        for rank, conn in zip(self.local_ranks, self.conns):
            if conn.poll():
                try:
                    status, payload = conn.recv()
                except (EOFError, OSError):
                    continue
                if status == "error":
                    errors.append((payload[0], rank, payload[1]))
        failed = {rank for _, rank, _ in errors}
        # A ready sentinel means the process is exiting, even while waitpid cannot reap it yet (is_alive() is
        # still True for that moment, long under load).
        exiting = set(wait([p.sentinel for p in self.procs], 0))
        dead = [r for r, p in zip(self.local_ranks, self.procs)
                if r not in failed and (p.sentinel in exiting or not p.is_alive())]
        if errors or dead:
            self._report(errors, dead, "idle time")

    def _send(self, method: str, arg: object) -> None:
        if self._broken:
            raise WorkerProcessError(self._broken)
        data = self._encode(method, arg)
        for rank, conn in zip(self.local_ranks, self.conns):
            try:
                conn.send_bytes(data)
            except OSError:
                self._fail(f"worker rank {rank} (pid {self.procs[rank].pid}) {describe_exit(self.procs[rank])}")

    def _wait(self, conns: list[Connection], what: str, timeout: float = 0) -> dict[Connection, object]:
        """Answers from `conns`; any worker's error message, closed pipe or exit raises WorkerProcessError at once."""
        pending, answers = set(conns), {}
        deadline = time.monotonic() + timeout if timeout else None
        sentinels = [p.sentinel for p in self.procs]
        while pending:
            ready = wait(self.conns + sentinels, _POLL_S)
            errors, silent = [], []
            for rank, conn in zip(self.local_ranks, self.conns):
                if conn in ready:
                    try:
                        status, payload = conn.recv()
                    except (EOFError, OSError):
                        silent.append(rank)
                        continue
                    if status == "error":
                        errors.append((payload[0], rank, payload[1]))
                    elif conn in pending:
                        answers[conn] = payload
                        pending.discard(conn)
                elif self.procs[rank].sentinel in ready and not conn.poll():
                    silent.append(rank)
            if errors or silent:
                self._report(errors, silent, what)
            if deadline is not None and time.monotonic() > deadline:
                self._fail(f"the workers did not finish {what} within the step timeout of {timeout:g} s "
                           "(--step-timeout); a rank stopped answering")
        return answers

    def _report(self, errors: list[tuple[float, int, str]], silent: list[int], what: str) -> None:
        """Name the cause: a rank that died without a word (killed, out of memory) comes before the errors
        its peers then hit in their collectives; among errors, the earliest."""
        if errors:  # a peer that is dying right now has closed its sockets but may not have exited yet
            wait([p.sentinel for p in self.procs], 0.2)
            failed = {rank for _, rank, _ in errors}
            for r, proc in zip(self.local_ranks, self.procs):
                if r in failed or r in silent or proc.is_alive():
                    continue
                message = self._last_message(r)  # a dead rank's pipe polls readable: EOF, or its last words
                if message is not None and message[0] == "error":
                    errors.append((message[1][0], r, message[1][1]))
                else:
                    silent.append(r)
        lines = [f"worker rank {r} (pid {self.procs[r].pid}) {describe_exit(self.procs[r])} during {what}"
                 for r in sorted(silent)]
        for _, rank, text in sorted(errors):
            last = text.strip().splitlines()[-1] if text.strip() else "unknown error"
            lines.append(f"worker rank {rank} failed during {what}: {last}")
        if self.config.nnodes > 1:
            lines.append("ranks on other nodes report in their `npu-infer worker` logs")
        details = "\n".join(text for _, _, text in sorted(errors))
        self._fail("; then ".join(lines) + (f"\n{details}" if details else ""))

    def _last_message(self, rank: int) -> tuple | None:
        conn = self.conns[rank]
        try:
            return conn.recv() if conn.poll() else None
        except (EOFError, OSError):
            return None

    def _fail(self, message: str) -> None:
        self._broken = f"the worker processes have stopped: {message.splitlines()[0]}"
        self._stopping.set()
        stop_workers(self.procs, self.conns, graceful=False)
        self._finalizer.detach()
        raise WorkerProcessError(message)


def _stop_all(stopping: threading.Event, procs: list, conns: list[Connection], encode) -> None:
    stopping.set()
    stop_workers(procs, conns, graceful=True, encode=encode)
