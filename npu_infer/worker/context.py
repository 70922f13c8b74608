"""The per-step attention metadata, set once per step so model code stays a plain forward pass."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor     # [T] int64: block_id * block_size + offset of each new token
    query_start_loc: torch.Tensor  # [B+1] int32 cumulative query lengths
    seq_lens: torch.Tensor         # [B] int32 context length after this step (cached + new)
    block_tables: torch.Tensor     # [B, max_blocks] int32, padded with 0
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    num_decodes: int               # sequences [0, num_decodes) have one new token each
    num_decode_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    derived: dict = field(default_factory=dict)  # per-step values a backend computes once for all layers


_context: AttentionMetadata | None = None


def set_context(meta: AttentionMetadata | None) -> None:
    global _context
    _context = meta


def get_context() -> AttentionMetadata:
    assert _context is not None, "attention ran outside a model step"
    return _context
