"""The per-step attention metadata, set once per step so model code stays a plain forward pass.

The model runner fills the common AttentionMetadata from the step's chunks; the attention backend's builder
(``build_metadata``) extends it, once per step, with what its kernels take; the layers only read the result."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """What every backend needs of one step, filled by the model runner (ModelRunner.prepare)."""
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


_context: AttentionMetadata | None = None


def set_context(meta: AttentionMetadata | None) -> None:
    """The step's metadata as the backend built it (a subclass of AttentionMetadata), or None between steps."""
    global _context
    _context = meta


def get_context() -> AttentionMetadata:
    assert _context is not None, "attention ran outside a model step"
    return _context
