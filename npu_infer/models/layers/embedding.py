"""Vocabulary-parallel embedding and LM head: each TP rank holds a contiguous slice of the vocabulary."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from npu_infer.distributed.parallel_state import get_tp_group
from npu_infer.models.layers.int8_linear import make_int8, quantize_weight
from npu_infer.models.layers.linear import linear

logger = logging.getLogger(__name__)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank_in_group, tp.world_size
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // self.tp_size)  # pad the last shard when vocab does not divide
        self.vocab_start = self.shard_size * self.tp_rank
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(f"embedding shape {tuple(loaded.shape)} does not match the model's "
                             f"({self.vocab_size}, {param.shape[1]})")
        part = loaded[self.vocab_start:self.vocab_start + self.shard_size]
        param.data.zero_()
        param.data[:part.shape[0]].copy_(part)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        in_shard = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * in_shard.unsqueeze(-1)
        return get_tp_group().all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocabulary slice, gathered so every rank sees the whole vocabulary."""

    platform_matmul = None  # as LinearBase.platform_matmul

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self, None)
        if self.tp_size > 1:
            logits = get_tp_group().all_gather(logits, dim=-1)
        return logits[..., :self.vocab_size]


def quantize_lm_head_int8(model: nn.Module, scheme: str, group_size: int | None = None) -> None:
    """Make the LM head int8 as quantize_linears_int8 makes a linear (NPU_INFER_INT8_LM_HEAD): at batch 64 on the
    CPU its [vocab, hidden] GEMM is a fifth of a SmolLM2 decode step. A tied embedding keeps its own weight in the
    model dtype (the lookup reads rows, not the GEMM). Its logits stay fp32 (`fp32_logits`). An earlier PP stage
    has no LM head: nothing to do there."""
    for head in (m for m in model.modules() if isinstance(m, ParallelLMHead)):
        k = head.weight.shape[1]
        group = group_size if scheme == "w8a16" and group_size is not None and k % group_size == 0 else None
        make_int8(head, scheme, *quantize_weight(head.weight.data, group))
        head.fp32_logits = True
        logger.info("quantized the LM head to %s", scheme)
