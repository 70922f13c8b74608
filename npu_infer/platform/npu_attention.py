"""Paged attention on Ascend NPUs through torch_npu's kernels (torch_npu imported lazily, in the constructor).

One step of a mixed batch (decodes first, then prefills):

1. ``_npu_reshape_and_cache`` writes this step's K/V into the paged cache at ``slot_mapping`` (int32).
2. Decodes (sequences ``[0, num_decodes)``, one token each): ``_npu_paged_attention`` over each sequence's
   blocks, ``context_lens`` a host int32 tensor (ATB reads it on the host).
3. Prefills (fresh, chunked, or with a cached prefix): ``npu_fused_infer_attention_score`` in page-attention
   mode, ``sparse_mode=3`` (rightDownCausal: query row i of a sequence with q new tokens and s context tokens
   sees keys 0 .. s-q+i) with the compressed 2048x2048 causal mask, query in TND layout with cumulative
   ``actual_seq_lengths`` and per-sequence ``actual_seq_lengths_kv`` (``prefill_layout="BSH"`` pads the
   queries to [B, max_q, H] instead, with per-sequence lengths).  TND is used where the kernel takes the
   head_dim (64, 128), BSH otherwise; ``NPU_INFER_NPU_ATTN_LAYOUT=TND|BSH`` forces either.

GQA goes through the kernels' own ``num_kv_heads`` / ``num_key_value_heads``; K/V are never repeated.

KV cache of one layer: ``(2, num_blocks, block_size, num_kv_heads, head_dim)``; ``[0]`` is K, ``[1]`` is V.
Each half is a contiguous ``[num_blocks, block_size, kv_heads, head_dim]`` tensor, the layout the ATB ops
take as is; the fused-attention kernel gets the same memory viewed as ``(num_blocks, block_size, H)`` (with
BSH/TND queries a 4-D cache would be read as ``(blocknum, KV_N, blocksize, D)``).

Block size: the paged prefill kernel needs a multiple of 128 in [128, 512] (query length > 1) and the decode
kernel needs ``block_size * head_dim <= 128 * 128``, so 128 is the one size that serves head_dim up to 128.

Without a KV cache (the memory-profiling run) every sequence is a fresh prefill: the fused kernel runs
without page attention, queries/keys/values padded to BSH.

Signatures and constraints: torch_npu 2.14.0, recorded in tests/npu_standin/declarations.json.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from npu_infer import envs

if TYPE_CHECKING:
    from npu_infer.worker.context import AttentionMetadata

logger = logging.getLogger(__name__)
BLOCK_SIZE = 128
MASK_SIZE = 2048  # sparse_mode 2/3/4 take this fixed-size compressed causal mask
# Forces the paged prefill's query layout: TND or BSH.  Some CANN versions reject TND with a block table
# (error 561002); BSH pads the queries and works on all of them.
LAYOUT_ENV = "NPU_INFER_NPU_ATTN_LAYOUT"
# Head dims npu_fused_infer_attention_score takes in TND layout with a block table (192 only on newer CANN).
TND_HEAD_DIMS = (64, 128)


def choose_prefill_layout(head_dim: int) -> str:
    """TND where the kernel takes this head_dim with a block table, BSH otherwise; $NPU_INFER_NPU_ATTN_LAYOUT wins."""
    raw = envs.NPU_INFER_NPU_ATTN_LAYOUT
    forced = (raw or "").strip().upper()
    if forced and forced not in ("TND", "BSH"):
        raise ValueError(f"{LAYOUT_ENV}={raw!r} is not a layout; use TND or BSH, or unset it")
    return forced or ("TND" if head_dim in TND_HEAD_DIMS else "BSH")

# Shared by every layer's backend instance (the model has one per attention layer): one 4 MiB mask per
# device, and the host-derived inputs of the current step.
_MASKS: dict[torch.device, torch.Tensor] = {}
_STEP: list = [None]


@dataclass
class _StepTensors:
    """Host-derived inputs of one step, shared by every layer of the step."""
    key: tuple
    meta: object                     # the metadata it was derived from (held, so its id is not reused)
    slots: torch.Tensor              # [T] int32, device
    decode_context_lens: torch.Tensor | None  # [num_decodes] int32, host
    prefill_cum_q: list[int]         # cumulative query lengths of the prefills (TND)
    prefill_q_lens: list[int]
    prefill_kv_lens: list[int]
    pad_index: torch.Tensor | None   # BSH: row of each prefill token in the padded [B * max_q] layout


class NpuAttentionBackend:
    def __init__(self, prefill_layout: str | None = None):
        """``prefill_layout``: TND or BSH; None chooses at the first step from the head_dim (choose_prefill_layout)."""
        from npu_infer.platform.npu import import_torch_npu
        if prefill_layout not in ("TND", "BSH", None):
            raise ValueError(f"prefill_layout must be TND or BSH, got {prefill_layout!r}")
        self._npu = import_torch_npu()
        self.prefill_layout = prefill_layout
        self._checked: set[tuple] = set()

    # ------------------------------------------------------------------ interface

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def check_block_size(self, block_size: int) -> None:
        if block_size != BLOCK_SIZE:
            raise ValueError(f"block size {block_size} cannot be used on NPU: the paged prefill kernel needs a "
                             f"multiple of 128 and the decode kernel at most 128*128/head_dim, so use {BLOCK_SIZE}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, num_heads: int, num_kv_heads: int,
                head_dim: int) -> torch.Tensor:
        self._check_shapes(num_heads, num_kv_heads, head_dim)
        num_tokens = q.shape[0]
        if sum(meta.query_lens_cpu) != num_tokens:
            raise ValueError(f"attention got {num_tokens} tokens but the metadata describes {sum(meta.query_lens_cpu)}")
        if kv_cache.numel() == 0:
            return self._prefill_without_cache(q, k, v, meta, scale, num_heads, num_kv_heads, head_dim)

        npu = self._npu
        step = self._step_tensors(meta, q.device)
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        npu._npu_reshape_and_cache(key=k.reshape(num_tokens, num_kv_heads, head_dim),
                                   value=v.reshape(num_tokens, num_kv_heads, head_dim),
                                   key_cache=key_cache, value_cache=value_cache, slot_indices=step.slots)
        nd = meta.num_decodes
        parts = []
        if nd:
            out = torch.empty(nd, num_heads, head_dim, dtype=q.dtype, device=q.device)
            npu._npu_paged_attention(query=q[:nd].reshape(nd, num_heads, head_dim), key_cache=key_cache,
                                     value_cache=value_cache, num_kv_heads=num_kv_heads, num_heads=num_heads,
                                     scale_value=scale, block_table=meta.block_tables[:nd],
                                     context_lens=step.decode_context_lens, out=out)
            parts.append(out.view(nd, num_heads * head_dim))
        if nd < len(meta.query_lens_cpu):
            parts.append(self._paged_prefill(q[nd:], key_cache, value_cache, meta, step, scale, num_heads,
                                             num_kv_heads, head_dim))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # ------------------------------------------------------------------ prefill

    def _paged_prefill(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       meta: AttentionMetadata, step: _StepTensors, scale: float, num_heads: int,
                       num_kv_heads: int, head_dim: int) -> torch.Tensor:
        num_blocks, block_size = key_cache.shape[:2]
        hidden = num_heads * head_dim
        nd = meta.num_decodes
        common = dict(atten_mask=self._mask(q.device), block_table=meta.block_tables[nd:],
                      actual_seq_lengths_kv=step.prefill_kv_lens, num_heads=num_heads,
                      num_key_value_heads=num_kv_heads, scale=scale, sparse_mode=3, block_size=block_size)
        keys = key_cache.view(num_blocks, block_size, num_kv_heads * head_dim)
        values = value_cache.view(num_blocks, block_size, num_kv_heads * head_dim)
        if self.prefill_layout == "TND":
            query = q.reshape(-1, num_heads, head_dim).contiguous()
            try:
                out, _ = self._npu.npu_fused_infer_attention_score(
                    query, keys, values, actual_seq_lengths=step.prefill_cum_q, input_layout="TND", **common)
            except RuntimeError as exc:  # same type, so callers that tell kernel rejections apart still can
                raise type(exc)(f"paged prefill attention in TND layout failed (head_dim {head_dim}): {exc}; "
                                   f"if this CANN rejects TND with a block table (e.g. error 561002), set "
                                   f"{LAYOUT_ENV}=BSH") from exc
            return out.view(-1, hidden)
        batch, max_q = len(step.prefill_q_lens), max(step.prefill_q_lens)
        query = _pad_rows(q, step.pad_index, batch * max_q).view(batch, max_q, hidden)
        out, _ = self._npu.npu_fused_infer_attention_score(
            query, keys, values, actual_seq_lengths=step.prefill_q_lens, input_layout="BSH", **common)
        return out.view(batch * max_q, hidden)[step.pad_index]

    def _prefill_without_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                               scale: float, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """No cache yet (profiling run): every sequence attends causally over this step's own K/V."""
        lens = list(meta.query_lens_cpu)
        batch, max_q = len(lens), max(lens)
        index = _pad_index(lens, max_q, q.device)
        rows = batch * max_q
        out, _ = self._npu.npu_fused_infer_attention_score(
            _pad_rows(q, index, rows).view(batch, max_q, num_heads * head_dim),
            _pad_rows(k, index, rows).view(batch, max_q, num_kv_heads * head_dim),
            _pad_rows(v, index, rows).view(batch, max_q, num_kv_heads * head_dim),
            atten_mask=self._mask(q.device), actual_seq_lengths=lens, actual_seq_lengths_kv=lens,
            num_heads=num_heads, num_key_value_heads=num_kv_heads, scale=scale, input_layout="BSH", sparse_mode=3)
        return out.view(rows, num_heads * head_dim)[index]

    # ------------------------------------------------------------------ helpers

    def _check_shapes(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        key = (num_heads, num_kv_heads, head_dim)
        if key in self._checked:
            return
        if num_heads % num_kv_heads or num_heads // num_kv_heads > 64:
            raise ValueError(f"{num_heads} query heads over {num_kv_heads} KV heads is not supported on NPU: the "
                             "attention kernels need a whole group of at most 64 query heads per KV head")
        if head_dim % 16 or BLOCK_SIZE * head_dim > 128 * 128:
            raise ValueError(f"head_dim {head_dim} is not supported on NPU: the attention kernels need a multiple "
                             f"of 16 and at most {128 * 128 // BLOCK_SIZE}")
        if self.prefill_layout is None:
            self.prefill_layout = choose_prefill_layout(head_dim)
            logger.info("NPU paged prefill layout %s for head_dim %d (%s forces TND or BSH)", self.prefill_layout,
                        head_dim, LAYOUT_ENV)
        self._checked.add(key)

    @staticmethod
    def _mask(device: torch.device) -> torch.Tensor:
        mask = _MASKS.get(device)
        if mask is None:
            mask = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool).triu(1).to(torch.int8).to(device)
            _MASKS[device] = mask
        return mask

    def _step_tensors(self, meta: AttentionMetadata, device: torch.device) -> _StepTensors:
        """Derived once per step: every layer's forward sees the same metadata object (a new one each step)."""
        key = (meta.num_decodes, tuple(meta.query_lens_cpu), tuple(meta.seq_lens_cpu), device, self.prefill_layout)
        step = _STEP[0]
        if step is not None and step.meta is meta and step.key == key:
            return step
        nd = meta.num_decodes
        q_lens, kv_lens = list(meta.query_lens_cpu[nd:]), list(meta.seq_lens_cpu[nd:])
        cum, total = [], 0
        for n in q_lens:
            total += n
            cum.append(total)
        pad_index = None
        if q_lens and self.prefill_layout == "BSH":
            pad_index = _pad_index(q_lens, max(q_lens), device)
        _STEP[0] = step = _StepTensors(
            key=key,
            meta=meta,
            slots=meta.slot_mapping.to(torch.int32),
            decode_context_lens=torch.tensor(meta.seq_lens_cpu[:nd], dtype=torch.int32) if nd else None,
            prefill_cum_q=cum, prefill_q_lens=q_lens, prefill_kv_lens=kv_lens, pad_index=pad_index)
        return step


def _pad_index(lens: list[int], width: int, device: torch.device) -> torch.Tensor:
    """Row of each packed token in the padded [len(lens) * width] layout."""
    index = [b * width + i for b, n in enumerate(lens) for i in range(n)]
    return torch.tensor(index, dtype=torch.long).to(device)


def _pad_rows(x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    padded = x.new_zeros(rows, x.shape[-1])
    padded[index] = x
    return padded
