"""Paged attention on Ascend NPUs through torch_npu's kernels (torch_npu imported lazily, in the constructor).

Once per step the model runner calls ``NpuAttentionBackend.build_metadata``: the common metadata and the forms the
kernels take of it (int32 slots, host context lengths, cumulative or padded prefill lengths, the causal mask, the
prefill layout) in one ``NpuAttentionMetadata``.  Each layer's ``NpuAttentionImpl`` (made by ``make_impl``, its
head counts and head_dim checked there, once) only reads it.

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

import torch

from npu_infer import envs
from npu_infer.platform.torch_npu_import import import_torch_npu
from npu_infer.worker.context import AttentionMetadata

logger = logging.getLogger(__name__)
BLOCK_SIZE = 128  # the one block size the kernels take (see "Block size" above); NpuPlatform enforces it
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


@dataclass
class NpuAttentionMetadata(AttentionMetadata):
    """The common metadata and the kernels' forms of it, built once per step by NpuAttentionBackend.build_metadata
    and read by every layer."""
    mask: torch.Tensor                        # the compressed 2048x2048 causal mask (sparse_mode 3), int8
    prefill_layout: str                       # TND or BSH: how the paged prefill's queries are laid out
    slots: torch.Tensor                       # [T] int32, device
    decode_context_lens: torch.Tensor | None  # [num_decodes] int32, host (ATB reads it on the host)
    prefill_cum_q: list[int]                  # cumulative query lengths of the prefills (TND)
    prefill_q_lens: list[int]
    prefill_kv_lens: list[int]
    pad_index: torch.Tensor | None            # BSH: row of each prefill token in the padded [B * max_q] layout


class NpuAttentionBackend:
    def __init__(self, head_dim: int, prefill_layout: str | None = None):
        """``prefill_layout``: TND or BSH; None chooses from the head_dim (choose_prefill_layout)."""
        if prefill_layout not in ("TND", "BSH", None):
            raise ValueError(f"prefill_layout must be TND or BSH, got {prefill_layout!r}")
        self._npu = import_torch_npu()
        if prefill_layout is None:
            prefill_layout = choose_prefill_layout(head_dim)
            logger.info("NPU paged prefill layout %s for head_dim %d (%s forces TND or BSH)", prefill_layout,
                        head_dim, LAYOUT_ENV)
        self.prefill_layout = prefill_layout
        self._masks: dict[torch.device, torch.Tensor] = {}  # one 4 MiB mask per device

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def build_metadata(self, common: AttentionMetadata) -> NpuAttentionMetadata:
        """Once per step, by the model runner: the host-derived inputs every layer's kernels take."""
        device = common.slot_mapping.device
        nd = common.num_decodes
        q_lens, kv_lens = list(common.query_lens_cpu[nd:]), list(common.seq_lens_cpu[nd:])
        cum, total = [], 0
        for n in q_lens:
            total += n
            cum.append(total)
        pad_index = None
        if q_lens and self.prefill_layout == "BSH":
            pad_index = _pad_index(q_lens, max(q_lens), device)
        return NpuAttentionMetadata(
            **vars(common), mask=self._mask(device), prefill_layout=self.prefill_layout,
            slots=common.slot_mapping.to(torch.int32),
            decode_context_lens=torch.tensor(common.seq_lens_cpu[:nd], dtype=torch.int32) if nd else None,
            prefill_cum_q=cum, prefill_q_lens=q_lens, prefill_kv_lens=kv_lens, pad_index=pad_index)

    def make_impl(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> NpuAttentionImpl:
        return NpuAttentionImpl(self._npu, num_heads, head_dim, scale, num_kv_heads)

    def _mask(self, device: torch.device) -> torch.Tensor:
        mask = self._masks.get(device)
        if mask is None:
            mask = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool).triu(1).to(torch.int8).to(device)
            self._masks[device] = mask
        return mask


class NpuAttentionImpl:
    """One layer's attention: its shapes checked once, here; forward reads the step's NpuAttentionMetadata."""

    def __init__(self, npu, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        if num_heads % num_kv_heads or num_heads // num_kv_heads > 64:
            raise ValueError(f"{num_heads} query heads over {num_kv_heads} KV heads is not supported on NPU: the "
                             "attention kernels need a whole group of at most 64 query heads per KV head")
        if head_dim % 16 or BLOCK_SIZE * head_dim > 128 * 128:
            raise ValueError(f"head_dim {head_dim} is not supported on NPU: the attention kernels need a multiple "
                             f"of 16 and at most {128 * 128 // BLOCK_SIZE}")
        self._npu = npu
        self.num_heads, self.head_dim, self.scale, self.num_kv_heads = num_heads, head_dim, scale, num_kv_heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: NpuAttentionMetadata) -> torch.Tensor:
        num_tokens = q.shape[0]
        if sum(meta.query_lens_cpu) != num_tokens:
            raise ValueError(f"attention got {num_tokens} tokens but the metadata describes {sum(meta.query_lens_cpu)}")
        if kv_cache.numel() == 0:
            return self._prefill_without_cache(q, k, v, meta)

        npu, num_heads, num_kv_heads, head_dim = self._npu, self.num_heads, self.num_kv_heads, self.head_dim
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        npu._npu_reshape_and_cache(key=k.reshape(num_tokens, num_kv_heads, head_dim),
                                   value=v.reshape(num_tokens, num_kv_heads, head_dim),
                                   key_cache=key_cache, value_cache=value_cache, slot_indices=meta.slots)
        nd = meta.num_decodes
        parts = []
        if nd:
            out = torch.empty(nd, num_heads, head_dim, dtype=q.dtype, device=q.device)
            npu._npu_paged_attention(query=q[:nd].reshape(nd, num_heads, head_dim), key_cache=key_cache,
                                     value_cache=value_cache, num_kv_heads=num_kv_heads, num_heads=num_heads,
                                     scale_value=self.scale, block_table=meta.block_tables[:nd],
                                     context_lens=meta.decode_context_lens, out=out)
            parts.append(out.view(nd, num_heads * head_dim))
        if nd < len(meta.query_lens_cpu):
            parts.append(self._paged_prefill(q[nd:], key_cache, value_cache, meta))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _paged_prefill(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       meta: NpuAttentionMetadata) -> torch.Tensor:
        num_heads, num_kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        num_blocks, block_size = key_cache.shape[:2]
        hidden = num_heads * head_dim
        nd = meta.num_decodes
        common = dict(atten_mask=meta.mask, block_table=meta.block_tables[nd:],
                      actual_seq_lengths_kv=meta.prefill_kv_lens, num_heads=num_heads,
                      num_key_value_heads=num_kv_heads, scale=self.scale, sparse_mode=3, block_size=block_size)
        keys = key_cache.view(num_blocks, block_size, num_kv_heads * head_dim)
        values = value_cache.view(num_blocks, block_size, num_kv_heads * head_dim)
        if meta.prefill_layout == "TND":
            query = q.reshape(-1, num_heads, head_dim).contiguous()
            try:
                out, _ = self._npu.npu_fused_infer_attention_score(
                    query, keys, values, actual_seq_lengths=meta.prefill_cum_q, input_layout="TND", **common)
            except RuntimeError as exc:  # same type, so callers that tell kernel rejections apart still can
                raise type(exc)(f"paged prefill attention in TND layout failed (head_dim {head_dim}): {exc}; "
                                   f"if this CANN rejects TND with a block table (e.g. error 561002), set "
                                   f"{LAYOUT_ENV}=BSH") from exc
            return out.view(-1, hidden)
        batch, max_q = len(meta.prefill_q_lens), max(meta.prefill_q_lens)
        query = _pad_rows(q, meta.pad_index, batch * max_q).view(batch, max_q, hidden)
        out, _ = self._npu.npu_fused_infer_attention_score(
            query, keys, values, actual_seq_lengths=meta.prefill_q_lens, input_layout="BSH", **common)
        return out.view(batch * max_q, hidden)[meta.pad_index]

    def _prefill_without_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               meta: NpuAttentionMetadata) -> torch.Tensor:
        """No cache yet (profiling run): every sequence attends causally over this step's own K/V.

        The padding index is made here, in every layer: the builder cannot tell this one step from the others."""
        num_heads, num_kv_heads = self.num_heads, self.num_kv_heads
        lens = list(meta.query_lens_cpu)
        batch, max_q = len(lens), max(lens)
        index = _pad_index(lens, max_q, q.device)
        rows = batch * max_q
        out, _ = self._npu.npu_fused_infer_attention_score(
            _pad_rows(q, index, rows).view(batch, max_q, num_heads * self.head_dim),
            _pad_rows(k, index, rows).view(batch, max_q, num_kv_heads * self.head_dim),
            _pad_rows(v, index, rows).view(batch, max_q, num_kv_heads * self.head_dim),
            atten_mask=meta.mask, actual_seq_lengths=lens, actual_seq_lengths_kv=lens,
            num_heads=num_heads, num_key_value_heads=num_kv_heads, scale=self.scale, input_layout="BSH",
            sparse_mode=3)
        return out.view(rows, num_heads * self.head_dim)[index]


def _pad_index(lens: list[int], width: int, device: torch.device) -> torch.Tensor:
    """Row of each packed token in the padded [len(lens) * width] layout."""
    index = [b * width + i for b, n in enumerate(lens) for i in range(n)]
    return torch.tensor(index, dtype=torch.long).to(device)


def _pad_rows(x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    padded = x.new_zeros(rows, x.shape[-1])
    padded[index] = x
    return padded
