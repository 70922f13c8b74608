"""MultiprocExecutor: one spawned process per TP/PP rank; each step goes down a pipe to every rank of this node.

The engine's process is not a rank. It encodes each step once (pickle on one node; JSON of known types when
other nodes take part, so nothing from the network is unpickled) and writes it to one pipe per local rank
(0.1-0.3 ms for 2-4 ranks here, against 0.6-2 ms for a gloo broadcast from rank 0), then waits on the pipe
of the rank that samples (last pipeline stage, tensor-parallel rank 0) together with every worker's pipe and
process sentinel, so a worker that raises or dies ends the wait at once with a WorkerProcessError (a
RuntimeError; the server exits on it). Keeping torch.distributed out of the engine's process also means the
engine never blocks inside a collective.

Multi-node: ranks on other nodes are started by `npu-infer worker` (worker_main below). They have no pipe to
the engine: rank 0 forwards each step to them with a gloo broadcast, and when the sampling rank lives on
another node it sends the step's output to rank 0, which hands it to the engine.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
from datetime import timedelta
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from npu_infer import envs
from npu_infer.config import EngineConfig
from npu_infer.platform import Platform
from npu_infer.worker.executor_base import Executor, WorkerProcessError, check_rpc_method
from npu_infer.worker.step_io import StepInput, StepOutput, decode_message, encode_message

logger = logging.getLogger(__name__)

# Ranks on other nodes wait for the next step inside a gloo broadcast; an idle server must not time them out.
_IDLE_TIMEOUT = timedelta(days=365)
_JOIN_TIMEOUT_S = 10.0
_POLL_S = 1.0


# ---- configuration --------------------------------------------------------------------------------------------
def check_parallel_config(config: EngineConfig) -> None:
    """Refuse, in one sentence, a TP/PP/node layout the model cannot be split into (before any process starts)."""
    from npu_infer.models.llama import pp_layer_range
    hf, tp, pp = config.hf_config, config.tensor_parallel_size, config.pipeline_parallel_size
    heads = hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    divisors = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
    if heads % tp:
        raise ValueError(f"the model's {heads} attention heads do not divide by --tensor-parallel-size {tp}; "
                         f"use a tensor parallel size of {divisors}, or split by layers with "
                         f"--pipeline-parallel-size instead")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"the model's {kv_heads} KV heads neither divide by nor divide --tensor-parallel-size {tp}; "
                         f"use a tensor parallel size that is a divisor or a multiple of {kv_heads}")
    if hf.intermediate_size % tp:
        raise ValueError(f"the model's intermediate size {hf.intermediate_size} does not divide by "
                         f"--tensor-parallel-size {tp}")
    for stage in range(pp):
        pp_layer_range(hf.num_hidden_layers, stage, pp)  # raises for too few layers or a bad partition
    if config.nnodes < 1 or not 0 <= config.node_rank < config.nnodes:
        raise ValueError(f"--node-rank {config.node_rank} must be in [0, --nnodes {config.nnodes})")
    if config.world_size % config.nnodes:
        raise ValueError(f"tp x pp = {config.world_size} ranks cannot be spread evenly over --nnodes "
                         f"{config.nnodes}; make the world size a multiple of the node count")
    if config.nnodes > 1 and config.master_port is None:
        raise ValueError("multi-node runs need --master-port (and --master-addr, rank 0's node address) "
                         "on every node")


def ranks_of_node(config: EngineConfig, node_rank: int) -> range:
    per_node = config.world_size // config.nnodes
    return range(node_rank * per_node, (node_rank + 1) * per_node)


def output_rank(config: EngineConfig) -> int:
    """The rank whose sampled tokens the engine uses: tensor-parallel rank 0 of the last pipeline stage."""
    return (config.pipeline_parallel_size - 1) * config.tensor_parallel_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_method(config: EngineConfig) -> str:
    if config.nnodes == 1 and config.master_port is None:
        return f"tcp://127.0.0.1:{_free_port()}"
    return f"tcp://{config.master_addr}:{config.master_port}"


def _is_plain(value: object) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return False


def plain_hf_config(hf_config: object) -> SimpleNamespace:
    """The model config's data attributes (properties included) as a namespace: unpickling a transformers config
    would import transformers in every worker, seconds of start-up per process."""
    values = {}
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # deprecated aliases warn when read
    try:
        for name in dir(hf_config):
            if name.startswith("__"):
                continue
            try:
                value = getattr(hf_config, name)
            except Exception:  # noqa: BLE001 - a property that does not apply to this config
                continue
            if not callable(value) and _is_plain(value):
                values[name] = value
    finally:
        quiet.setLevel(level)
    return SimpleNamespace(**values)


def _for_workers(config: EngineConfig) -> EngineConfig:
    plain = copy.copy(config)
    plain.hf_config = plain_hf_config(config.hf_config)
    return plain


# Settings every rank must share: a difference would make the ranks' collectives disagree (or hang).
_SHARED = ("tensor_parallel_size", "pipeline_parallel_size", "nnodes", "torch_dtype", "block_size", "max_model_len",
           "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory", "gpu_memory_utilization",
           "num_gpu_blocks_override", "load_format", "quantization", "seed")


def _plain_setting(value: object) -> object:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _flag(name: str) -> str:
    return name if name.isupper() else "--" + name.removeprefix("torch_").replace("_", "-")


def _threads_per_rank(num_local_ranks: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // num_local_ranks)


# ---- messages: pickled to this node's children, JSON of known types (step_io) to other nodes --------------------
_MAX_MESSAGE_BYTES = 2**30


def _encoder(config: EngineConfig):
    if config.nnodes > 1:
        return encode_message
    return lambda method, arg: pickle.dumps((method, arg), protocol=pickle.HIGHEST_PROTOCOL)


def _decoder(config: EngineConfig):
    return decode_message if config.nnodes > 1 else pickle.loads


def _checked_length(length: torch.Tensor) -> int:
    n = int(length.item())
    if not 0 < n <= _MAX_MESSAGE_BYTES:
        raise ValueError(f"a message from another node claims {n} bytes; refused")
    return n


def _broadcast_bytes(data: bytes | None, group) -> bytes:
    """Rank 0's bytes to every member: the length, then the bytes, as uint8 tensors (nothing pickled)."""
    length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(length, src=0, group=group)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if data is not None
           else torch.empty(_checked_length(length), dtype=torch.uint8))
    dist.broadcast(buf, src=0, group=group)
    return data if data is not None else buf.numpy().tobytes()


def _send_bytes(data: bytes, dst: int, group) -> None:
    dist.send(torch.tensor([len(data)], dtype=torch.int64), dst=dst, group=group)
    dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=dst, group=group)


def _recv_bytes(src: int, group) -> bytes:
    length = torch.zeros(1, dtype=torch.int64)
    dist.recv(length, src=src, group=group)
    buf = torch.empty(_checked_length(length), dtype=torch.uint8)
    dist.recv(buf, src=src, group=group)
    return buf.numpy().tobytes()


def _all_gather_json(value: object, group, size: int) -> list:
    """Every member's JSON-able value, in rank order of the group."""
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([data.numel()], dtype=torch.int64), group=group)
    longest = max(_checked_length(n) for n in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:data.numel()] = data
    gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(size)]
    dist.all_gather(gathered, padded, group=group)
    return [json.loads(g[:int(n.item())].numpy().tobytes()) for g, n in zip(gathered, lengths)]


# ---- the worker process ---------------------------------------------------------------------------------------
class _Channel:
    """How one rank receives each message and returns the step's output (pipe on node 0, gloo elsewhere)."""

    def __init__(self, config: EngineConfig, rank: int, conn: Connection | None):
        self.rank, self.conn = rank, conn
        self.decode = _decoder(config)
        self.output_rank = output_rank(config)
        remote = [r for r in range(config.world_size) if r not in ranks_of_node(config, 0)]
        self.remote_output = self.output_rank in remote
        # Every rank takes part in creating every group, members or not.
        self.group = dist.new_group([0] + remote, backend="gloo", timeout=_IDLE_TIMEOUT) if remote else None
        self.forwards = self.group is not None and rank == 0
        if self.group is not None and (rank == 0 or rank in remote):
            self._check_same_settings(config, [0] + remote)

    def _check_same_settings(self, config: EngineConfig, group_ranks: list[int]) -> None:
        """Other nodes parse their own flags: every rank of the group refuses a setting that differs from node 0's."""
        mine = {name: _plain_setting(getattr(config, name)) for name in _SHARED}
        mine["NPU_INFER_PP_LAYER_PARTITION"] = envs.NPU_INFER_PP_LAYER_PARTITION
        everyone = _all_gather_json(mine, self.group, len(group_ranks))
        differ = [f"rank {rank} has {_flag(name)} {value} where node 0 has {everyone[0][name]}"
                  for rank, settings in zip(group_ranks, everyone) for name, value in settings.items()
                  if value != everyone[0][name]]
        if differ:
            raise ValueError("the nodes were started with different settings; pass the same flags to the server "
                             "and to every `npu-infer worker`: " + "; ".join(differ))

    def recv(self) -> tuple[str, object]:
        if self.conn is not None:
            data = self.conn.recv_bytes()
            if self.forwards:
                _broadcast_bytes(data, self.group)
        else:
            data = _broadcast_bytes(None, self.group)
        return self.decode(data)

    def reply(self, payload: object) -> None:
        """Answer a message every local rank answers (ready, collective_rpc)."""
        if self.conn is not None:
            self.conn.send(("ok", payload))

    def step_output(self, out: StepOutput | None) -> None:
        if self.rank == self.output_rank:
            if self.conn is not None:
                self.conn.send(("ok", out))
            else:
                _send_bytes(encode_message("ok", out), dst=0, group=self.group)
        elif self.rank == 0 and self.remote_output:
            _, out = decode_message(_recv_bytes(self.output_rank, self.group))
            self.conn.send(("ok", out))


def _worker_process(config: EngineConfig, device_type: str, rank: int, local_rank: int, num_local_ranks: int,
                    init_method: str, conn: Connection | None, log_level: int) -> None:
    torch.set_num_threads(_threads_per_rank(num_local_ranks))
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    from npu_infer.platform import get_platform
    from npu_infer.worker.worker import Worker
    try:
        worker = Worker(config, get_platform(device_type), rank, local_rank, init_method)
        worker.init_device()
        channel = _Channel(config, rank, conn)
        worker.load_model()
        # Every rank profiles its own share; all ranks use the smallest block count.
        blocks = worker.min_across_ranks(worker.determine_num_blocks())
        channel.reply({"num_blocks": blocks, "memory": dict(worker.memory)})
        while True:
            method, arg = channel.recv()
            if method == "execute":
                channel.step_output(worker.execute_model(arg))
            elif method == "ping":  # the message path alone, no model: its cost per step
                channel.step_output(None)
            elif method == "shutdown":
                break
            else:  # collective_rpc: every local rank answers
                check_rpc_method(method)
                channel.reply(getattr(worker, method)(arg))
    except EOFError:
        os._exit(0)  # the engine is gone: nothing to report to
    except BaseException:
        message = traceback.format_exc()
        logger.error("worker failed:\n%s", message)
        try:
            if conn is not None:
                conn.send(("error", (time.time(), message)))
        except OSError:
            pass
        logging.shutdown()
        os._exit(1)  # not sys.exit: peers may be gone, and tearing the process group down could block
    worker.shutdown()


def _spawn(config: EngineConfig, device_type: str, node_rank: int, init_method: str,
           with_pipes: bool) -> tuple[list, list[Connection]]:
    ctx = mp.get_context("spawn")
    ranks = ranks_of_node(config, node_rank)
    procs, conns = [], []
    for local_rank, rank in enumerate(ranks):
        parent_end, child_end = ctx.Pipe() if with_pipes else (None, None)
        proc = ctx.Process(target=_worker_process, name=f"npu_infer-rank{rank}", daemon=True,
                           args=(config, device_type, rank, local_rank, len(ranks), init_method, child_end,
                                 logging.getLogger().getEffectiveLevel()))
        proc.start()
        if child_end is not None:
            child_end.close()  # so the engine's end sees EOF when the worker dies
            conns.append(parent_end)
        procs.append(proc)
    return procs, conns


def _stop(procs: list, conns: list[Connection], graceful: bool, encode=None) -> None:
    """graceful: send `shutdown` (encoded by `encode`) and wait a while before terminating."""
    if graceful:
        data = encode("shutdown", None)
        for conn in conns:
            try:
                conn.send_bytes(data)
            except OSError:
                pass
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
    for conn in conns:
        conn.close()


def _watch_workers(procs: list, ranks: list[int], stopping: threading.Event, callbacks: list) -> None:
    """Notice a worker that exits while the engine is idle, when no step would notice it before the next request.
    Only waits on the sentinels (never reaps a process): the engine's thread describes the exit."""
    ready = wait([p.sentinel for p in procs])
    if stopping.is_set():
        return
    gone = ", ".join(f"rank {r} (pid {p.pid})" for r, p in zip(ranks, procs) if p.sentinel in ready)
    logger.error("worker %s exited; the engine cannot run another step", gone)
    for callback in list(callbacks):
        callback()


def _stop_all(stopping: threading.Event, procs: list, conns: list[Connection], encode) -> None:
    stopping.set()
    _stop(procs, conns, graceful=True, encode=encode)


def _describe_exit(proc) -> str:
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


# ---- the engine's side ----------------------------------------------------------------------------------------
class MultiprocExecutor(Executor):
    """Spawns this node's ranks, hands every step to all of them, returns the sampling rank's StepOutput."""

    def __init__(self, config: EngineConfig, platform: Platform):
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
        self.procs, self.conns = _spawn(_for_workers(config), platform.device_type, 0, _init_method(config),
                                        with_pipes=True)
        self._stopping = threading.Event()  # set before the executor stops its workers itself
        self._encode = _encoder(config)
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
        threading.Thread(target=_watch_workers, name="npu-infer-worker-watch", daemon=True,
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
        self._send("execute", step)
        return self._wait([self._output_conn], "execute", self.step_timeout)[self._output_conn]

    def ping(self, payload: object = None) -> None:
        """Send `payload` (e.g. a StepInput) to every rank and wait for the sampling rank's answer, running no
        model: what the message path alone costs per step (benchmarks/parallel_overhead.py)."""
        self._send("ping", payload)
        self._wait([self._output_conn], "ping")

    def shutdown(self) -> None:
        self._finalizer()  # runs _stop once; later calls do nothing

    def register_failure_callback(self, callback: Callable[[], None]) -> None:
        self._on_failure.append(callback)  # called by _watch_workers when a worker exits between steps

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
                self._fail(f"worker rank {rank} (pid {self.procs[rank].pid}) {_describe_exit(self.procs[rank])}")

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
        lines = [f"worker rank {r} (pid {self.procs[r].pid}) {_describe_exit(self.procs[r])} during {what}"
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
        _stop(self.procs, self.conns, graceful=False)
        self._finalizer.detach()
        raise WorkerProcessError(message)


# ---- `npu-infer worker`: the ranks of one node other than node 0 -----------------------------------------------
_NOT_FLAGS = {"hf_config", "torch_dtype", "model_path"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npu-infer worker",
        description="Run the tensor/pipeline-parallel ranks of one node other than node 0. Pass the same model "
                    "and parallel flags as the server on node 0, plus --nnodes, --node-rank, --master-addr "
                    "(node 0's address) and --master-port. Server-only flags are ignored.")
    for f in dataclasses.fields(EngineConfig):
        if f.name in _NOT_FLAGS:
            continue
        names = ["--" + f.name.replace("_", "-")]
        if f.name == "tensor_parallel_size":
            names.append("-tp")
        elif f.name == "pipeline_parallel_size":
            names.append("-pp")
        if f.type == "bool":
            parser.add_argument(*names, dest=f.name, action="store_true")
        else:
            kind = float if f.type == "float" else int if f.type in ("int", "int | None") else str
            parser.add_argument(*names, dest=f.name, type=kind, default=f.default)
    return parser


def worker_main(argv: list[str]) -> int:
    """Start this node's ranks and wait for them; exit non-zero when one of them fails."""
    args, ignored = _parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ignored:
        logger.info("ignoring server-only arguments: %s", " ".join(ignored))
    config = EngineConfig(**vars(args))
    if config.nnodes < 2 or config.node_rank < 1:
        raise SystemExit("npu-infer worker runs the ranks of node 1.. of a multi-node run: pass --nnodes N (>= 2) "
                         "and --node-rank K (1 <= K < N); node 0 runs the server")
    from npu_infer.loaders.hf_files import load_hf_config
    from npu_infer.loaders.model_path import resolve_model_path
    from npu_infer.platform import get_platform
    platform = get_platform(config.device)
    config.model_path = resolve_model_path(config.model)
    # As LLMEngine resolves it on node 0 (the ranks then check that the results agree).
    config.resolve(load_hf_config(config), platform.default_dtype(), platform.supported_dtypes(),
                   platform.device_type, default_block_size=platform.default_block_size(),
                   supported_block_sizes=platform.supported_block_sizes())
    check_parallel_config(config)
    ranks, init_method = ranks_of_node(config, config.node_rank), _init_method(config)
    logger.info("node %d: starting ranks %d..%d, rendezvous at %s", config.node_rank, ranks[0], ranks[-1], init_method)
    procs, _ = _spawn(_for_workers(config), platform.device_type, config.node_rank, init_method, with_pipes=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        pending = {p.sentinel: p for p in procs}
        while pending:
            for sentinel in wait(list(pending)):
                proc = pending.pop(sentinel)
                proc.join()
                if proc.exitcode != 0:
                    logger.error("%s %s; stopping this node's other ranks", proc.name, _describe_exit(proc))
                    return 1
        return 0
    finally:
        _stop(procs, [], graceful=False)
