"""Where the ranks run: the TP/PP/node layout checked against the model, each node's ranks, the sampling rank and
the rendezvous address."""
from __future__ import annotations

import ipaddress
import socket

from npu_infer.config import EngineConfig
from npu_infer.models.llama import pp_layer_range


def check_parallel_config(config: EngineConfig) -> None:
    """Refuse, in one sentence, a TP/PP/node layout the model cannot be split into (before any process starts)."""
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
    if config.node_rank >= 1 and _is_this_machine(config.master_addr):
        # Node 0's rendezvous store is not on this machine: the ranks here would wait for it until the timeout.
        raise ValueError(f"--master-addr {config.master_addr} names this machine, not node 0; on node "
                         f"{config.node_rank} pass node 0's network address (the same --master-addr as node 0's)")


def _is_this_machine(addr: str) -> bool:
    """Loopback (127.x, ::1, localhost) or the unspecified address (0.0.0.0, ::): never another node."""
    host = addr.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name: resolving it here could hang, and it may well name node 0
    return ip.is_loopback or ip.is_unspecified


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


def rendezvous_address(config: EngineConfig) -> str:
    """torch.distributed's init_method: a free local port for one node, else --master-addr:--master-port."""
    if config.nnodes == 1 and config.master_port is None:
        return f"tcp://127.0.0.1:{_free_port()}"
    return f"tcp://{config.master_addr}:{config.master_port}"
