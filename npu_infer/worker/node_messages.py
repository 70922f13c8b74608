"""How messages reach the ranks: pickled to this node's children; JSON of known types (step_io) when other nodes
take part, carried between nodes by gloo as a length and then uint8 bytes, so nothing from the network is
unpickled."""
from __future__ import annotations

import json
import pickle
from collections.abc import Callable

import torch
import torch.distributed as dist

from npu_infer.config import EngineConfig
from npu_infer.worker.step_io import decode_message, encode_message

_MAX_MESSAGE_BYTES = 2**30


def message_encoder(config: EngineConfig) -> Callable[[str, object], bytes]:
    if config.nnodes > 1:
        return encode_message
    return lambda method, arg: pickle.dumps((method, arg), protocol=pickle.HIGHEST_PROTOCOL)


def message_decoder(config: EngineConfig) -> Callable[[bytes], tuple[str, object]]:
    return decode_message if config.nnodes > 1 else pickle.loads


def _checked_length(length: torch.Tensor) -> int:
    n = int(length.item())
    if not 0 < n <= _MAX_MESSAGE_BYTES:
        raise ValueError(f"a message from another node claims {n} bytes; refused")
    return n


def broadcast_bytes(data: bytes | None, group) -> bytes:
    """Rank 0's bytes to every member: the length, then the bytes, as uint8 tensors (nothing pickled)."""
    length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(length, src=0, group=group)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if data is not None
           else torch.empty(_checked_length(length), dtype=torch.uint8))
    dist.broadcast(buf, src=0, group=group)
    return data if data is not None else buf.numpy().tobytes()


def send_bytes(data: bytes, dst: int, group) -> None:
    dist.send(torch.tensor([len(data)], dtype=torch.int64), dst=dst, group=group)
    dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=dst, group=group)


def recv_bytes(src: int, group) -> bytes:
    length = torch.zeros(1, dtype=torch.int64)
    dist.recv(length, src=src, group=group)
    buf = torch.empty(_checked_length(length), dtype=torch.uint8)
    dist.recv(buf, src=src, group=group)
    return buf.numpy().tobytes()


def all_gather_json(value: object, group, size: int) -> list:
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
