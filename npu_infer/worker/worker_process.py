"""A worker process: one TP/PP rank's loop (receive a message, run it, answer), how it receives and answers
(_Channel), and how a node's ranks are spawned and stopped."""
from __future__ import annotations

import copy
import logging
import os
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from npu_infer import envs
from npu_infer.config import EngineConfig
from npu_infer.platform import init_platform
from npu_infer.worker.executor_base import check_rpc_method
from npu_infer.worker.node_messages import all_gather_json, broadcast_bytes, message_decoder, recv_bytes, send_bytes
from npu_infer.worker.parallel_layout import output_rank, ranks_of_node
from npu_infer.worker.step_io import StepOutput, decode_message, encode_message
from npu_infer.worker.worker import Worker

logger = logging.getLogger(__name__)

# Ranks on other nodes wait for the next step inside a gloo broadcast; an idle server must not time them out.
_IDLE_TIMEOUT = timedelta(days=365)
_JOIN_TIMEOUT_S = 10.0


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


def for_workers(config: EngineConfig) -> EngineConfig:
    """The config as the worker processes get it: the model config as plain data."""
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



class _Channel:
    """How one rank receives each message and returns the step's output (pipe on node 0, gloo elsewhere)."""

    def __init__(self, config: EngineConfig, rank: int, conn: Connection | None):
        self.rank, self.conn = rank, conn
        self.decode = message_decoder(config)
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
        everyone = all_gather_json(mine, self.group, len(group_ranks))
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
                broadcast_bytes(data, self.group)
        else:
            data = broadcast_bytes(None, self.group)
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
                send_bytes(encode_message("ok", out), dst=0, group=self.group)
        elif self.rank == 0 and self.remote_output:
            _, out = decode_message(recv_bytes(self.output_rank, self.group))
            self.conn.send(("ok", out))


def _worker_process(config: EngineConfig, rank: int, local_rank: int, num_local_ranks: int,
                    init_method: str, conn: Connection | None, log_level: int) -> None:
    torch.set_num_threads(_threads_per_rank(num_local_ranks))
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    try:
        init_platform(config.device)  # the device the engine's process decided (check_and_update_config)
        worker = Worker(config, rank, local_rank, init_method)
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


def spawn_workers(config: EngineConfig, node_rank: int, init_method: str,
                  with_pipes: bool) -> tuple[list, list[Connection]]:
    """Start one process per rank of this node; with_pipes (node 0): each with a pipe to the engine."""
    ctx = mp.get_context("spawn")
    ranks = ranks_of_node(config, node_rank)
    procs, conns = [], []
    for local_rank, rank in enumerate(ranks):
        parent_end, child_end = ctx.Pipe() if with_pipes else (None, None)
        proc = ctx.Process(target=_worker_process, name=f"npu_infer-rank{rank}", daemon=True,
                           args=(config, rank, local_rank, len(ranks), init_method, child_end,
                                 logging.getLogger().getEffectiveLevel()))
        proc.start()
        if child_end is not None:
            child_end.close()  # so the engine's end sees EOF when the worker dies
            conns.append(parent_end)
        procs.append(proc)
    return procs, conns


def stop_workers(procs: list, conns: list[Connection], graceful: bool, encode=None) -> None:
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
