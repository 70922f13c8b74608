"""Paged attention in plain torch (CPU and CUDA): one indexed write, one gather, one SDPA call per phase.

The cache is [2 (K, V), KV heads, blocks, block_size, head_dim]: head-major, so the blocks gathered for a
decode step are, per KV head, contiguous [sequences, tokens, head_dim] slabs that batched matmuls read in place.

TorchAttentionBackend builds the step's metadata once (build_metadata, called by the model runner) and makes one
TorchAttentionImpl per layer (make_impl), which holds the layer's constants and only reads the metadata."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from npu_infer.worker.context import AttentionMetadata


# From this many decode sequences on, decode attention is two batched matmuls instead of one SDPA call
# (measured on 2 cores, bf16, per layer: 491 -> 318 us at 16 sequences, 3.65 -> 1.86 ms at 64; slower below ~4).
MATMUL_DECODE_MIN_BATCH = 8


@dataclass
class TorchAttentionMetadata(AttentionMetadata):
    """The common metadata and what the decode path gathers with, the same for every layer of the step."""
    decode_blocks: torch.Tensor | None  # [num_decodes * max_blocks] int64: each decode sequence's blocks, padded
    decode_mask: torch.Tensor | None    # [1, num_decodes, 1, max_blocks * block_size]: True up to each length


class TorchAttentionBackend:
    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (2, num_kv_heads, num_blocks, block_size, head_dim)

    def build_metadata(self, common: AttentionMetadata) -> TorchAttentionMetadata:
        """Once per step, by the model runner."""
        nd = common.num_decodes
        if not nd:
            return TorchAttentionMetadata(**vars(common), decode_blocks=None, decode_mask=None)
        max_blocks = -(-max(common.seq_lens_cpu[:nd]) // common.block_size)
        blocks = common.block_tables[:nd, :max_blocks].long().flatten()
        positions = torch.arange(max_blocks * common.block_size, device=common.seq_lens.device)
        mask = (positions[None, :] < common.seq_lens[:nd, None])[None, :, None, :]
        return TorchAttentionMetadata(**vars(common), decode_blocks=blocks, decode_mask=mask)

    def make_impl(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> TorchAttentionImpl:
        return TorchAttentionImpl(num_heads, head_dim, scale, num_kv_heads)


class TorchAttentionImpl:
    """One layer's attention: its constants set once, the step's metadata read on every call."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        self.num_heads, self.head_dim, self.scale, self.num_kv_heads = num_heads, head_dim, scale, num_kv_heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: TorchAttentionMetadata) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape[0], self.num_heads, self.head_dim
        q = q.view(num_tokens, num_heads, head_dim)
        k = k.view(num_tokens, self.num_kv_heads, head_dim)
        v = v.view(num_tokens, self.num_kv_heads, head_dim)
        has_cache = kv_cache.numel() > 0
        if has_cache:
            self._write_cache(k, v, kv_cache, meta)
        nd = meta.num_decodes if has_cache else 0  # profile_run has no cache: everything is a fresh prefill
        if nd == num_tokens:
            return self._decode(q, kv_cache, meta).view(num_tokens, num_heads * head_dim)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, meta)
        start, i = nd, nd
        q_lens, seq_lens = meta.query_lens_cpu, meta.seq_lens_cpu
        while i < len(q_lens):
            q_len, seq_len = q_lens[i], seq_lens[i]
            if seq_len == q_len or not has_cache:  # fresh prefill: attend over this step's own k/v
                # A run of fresh prefills of one length is one batched SDPA call (profile_run, equal prompts).
                run = 1
                while i + run < len(q_lens) and q_lens[i + run] == q_len and (seq_lens[i + run] == q_len
                                                                              or not has_cache):
                    run += 1
                end = start + run * q_len
                out[start:end] = self._prefill_batch(q[start:end], k[start:end], v[start:end], run)
                i += run
            else:  # chunked prefill or prefix-cache hit: the context comes from the cache
                end = start + q_len
                num_blocks = -(-seq_len // meta.block_size)
                blocks = meta.block_tables[i, :num_blocks].long()
                kvs = _gather_blocks(kv_cache, blocks).flatten(2, 3)[:, :, :seq_len].transpose(1, 2)  # [2, L, KVH, D]
                out[start:end] = self._prefill(q[start:end], kvs[0], kvs[1], seq_len - q_len)
                i += 1
            start = end
        return out.view(num_tokens, num_heads * head_dim)

    def _write_cache(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                     meta: TorchAttentionMetadata) -> None:
        """k/v [T, KVH, D] into their slots of the cache."""
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        key_cache = kv_cache[0].view(num_kv_heads, -1, head_dim)  # [KVH, slots, D]
        value_cache = kv_cache[1].view(num_kv_heads, -1, head_dim)
        key_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        value_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))

    def _prefill_batch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int) -> torch.Tensor:
        """`batch` fresh prefills of equal length, laid end to end in q/k/v [batch * L, heads, D]: causal SDPA."""
        q_b = q.view(batch, -1, *q.shape[1:]).transpose(1, 2)
        k_b = k.view(batch, -1, *k.shape[1:]).transpose(1, 2)
        v_b = v.view(batch, -1, *v.shape[1:]).transpose(1, 2)
        o = F.scaled_dot_product_attention(q_b, k_b, v_b, is_causal=True, scale=self.scale,
                                           enable_gqa=q.shape[1] != self.num_kv_heads)
        return o.transpose(1, 2).reshape(q.shape)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_before: int) -> torch.Tensor:
        """q [Q, H, D] at positions context_before.., k/v [context_before + Q, KVH, D]."""
        q_len, num_heads, _ = q.shape
        q_t, k_t, v_t = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        gqa, scale = num_heads != self.num_kv_heads, self.scale
        if context_before == 0:
            o = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            q_pos = torch.arange(context_before, context_before + q_len, device=q.device)
            mask = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return o.transpose(0, 1)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: TorchAttentionMetadata) -> torch.Tensor:
        """All decode sequences at once: gather each one's blocks, mask past its length, one attention call.

        GQA without repeating K/V: the query heads of one KV head become that head's query rows. Batched over
        [KV head, sequence], which the head-major cache gives without a copy."""
        nd, num_heads, head_dim = q.shape
        num_kv_heads, mask = self.num_kv_heads, meta.decode_mask
        kvs = _gather_blocks(kv_cache, meta.decode_blocks).view(2, num_kv_heads, nd, -1, head_dim)
        keys, values = kvs[0], kvs[1]  # [KVH, nd, L, D]
        q_groups = q.view(nd, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 1)  # [KVH, nd, G, D]
        if nd >= MATMUL_DECODE_MIN_BATCH:
            o = _matmul_attention(q_groups, keys, values, mask, self.scale)
        else:
            o = F.scaled_dot_product_attention(q_groups, keys, values, attn_mask=mask, scale=self.scale)
        return o.transpose(0, 1).reshape(nd, num_heads, head_dim)


def _gather_blocks(kv_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """K and V of the given blocks in one copy: [2, KVH, len(blocks), block_size, D].

    One index_select over the block dimension; advanced indexing (`cache[0][blocks]`) is 10-100x slower on CPU
    for these shapes, and gathering K and V separately doubles the op count."""
    return kv_cache.index_select(2, blocks)


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Two batched matmuls with the softmax in fp32, as transformers' eager attention computes it (scores in
    the input dtype). With a few query rows per KV head, CPU SDPA's flash kernel is ~2x slower than this."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    probs = scores.masked_fill_(~mask, float("-inf")).softmax(dim=-1)
    return torch.matmul(probs.to(q.dtype), v)
