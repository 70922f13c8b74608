"""GGUF decoder linears served as stored, never dequantized to bf16, as vLLM serves a GGUF's quantized tensors:
- Q8_0 as W8A16 layers with one fp32 scale per 32 weights (Q8_0's block: an fp16 d and 32 int8 q), by default;
- Q4_0 / Q4_1 as W4A16 layers (int4_linear.py: d * q + m per 32 weights) with `--quantization gguf`, on the CPU
  in bf16 (cpu_int4_kernels.cpp); otherwise, and by default, they are dequantized as any other GGUF type.

Which linears: those whose checkpoint tensors all have the type (a merged layer, q/k/v or gate/up, only when every
part does; otherwise the layer is dequantized). The embedding and the LM head stay dequantized (in the model dtype).
Not in fp32: there a dequantized Q8_0 weight is exact (q * d needs at most 19 bits), the same numbers, and the fp32
kernels are faster than the int8 twin. `--quantization w8a8` on a Q8_0 file is refused (formats.py): its linears are
int8 already and would be quantized twice; `--quantization w8a16` serves them as stored too."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from npu_infer.config import EngineConfig
from npu_infer.models.layers.int4_linear import prepare_int4
from npu_infer.models.layers.int8_linear import prepare_int8
from npu_infer.models.layers.linear import LinearBase

logger = logging.getLogger(__name__)

GGUF_GROUP = 32  # Q8_0's and Q4's block
# Source schemes under which Q8_0 linears are served as stored (bitsandbytes re-quantizes dequantized weights).
AS_STORED_UNDER = (None, "gguf", "w8a16")
Q4_NAMES = ("Q4_0", "Q4_1")


def linear_weights_of_type(path: str, kinds: tuple[str, ...]) -> set[str]:
    """HF names (`...q_proj.weight`) of the decoder linear weights stored as one of `kinds` in the GGUF file `path`."""
    from npu_infer.loaders.gguf_loader import tensor_types  # lazy: importing gguf takes ~0.1 s
    return {name for name, kind in tensor_types(path).items()
            if kind in kinds and name.startswith("model.layers.") and name.endswith(".weight") and "_proj." in name}


def q8_0_linear_weights(path: str) -> set[str]:
    return linear_weights_of_type(path, ("Q8_0",))


def _prepare_stored(model: nn.Module, stored: set[str], prepare: Callable[[nn.Module], None]) -> set[str]:
    """`prepare` each LinearBase of `model` whose checkpoint pieces are all in `stored`; their HF weight names."""
    parts_of: dict[str, list[str]] = {}  # our merged module -> its checkpoint pieces
    for piece, (merged, _) in getattr(model, "packed_modules", {}).items():
        parts_of.setdefault(merged, []).append(piece)
    served = set()
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase) or getattr(module, "quant_scheme", None) is not None:
            continue
        leaf = name.rsplit(".", 1)[-1]
        weights = [f"{name[:-len(leaf)]}{piece}.weight" for piece in parts_of.get(leaf, [leaf])]
        # A row-parallel shard of K may split a block: that layer is dequantized instead.
        if all(w in stored for w in weights) and module.weight.shape[1] % GGUF_GROUP == 0:
            prepare(module)
            served.update(weights)
    return served


def prepare_q8_0_layers(model: nn.Module, config: EngineConfig) -> set[str]:
    """Make each LinearBase of `model` whose checkpoint tensors are all Q8_0 a W8A16 layer with G = 32, ready to be
    loaded into; returns the HF weight names to read as stored (gguf_loader.iterate_gguf_weights' `int8`)."""
    if config.quantization not in AS_STORED_UNDER or config.torch_dtype == torch.float32:
        return set()
    stored = q8_0_linear_weights(config.model_path)
    if not stored:
        return set()
    served = _prepare_stored(model, stored, lambda module: prepare_int8(module, "w8a16", GGUF_GROUP))
    logger.info("GGUF: %d Q8_0 linear weights served as stored (W8A16, %d-weight groups)", len(served), GGUF_GROUP)
    return served


def _q4_as_stored(config: EngineConfig) -> bool:
    """`--quantization gguf` on the CPU in bf16: where Q4 linears and a Q8_0 head are served as stored."""
    return config.quantization == "gguf" and config.device == "cpu" and config.torch_dtype == torch.bfloat16


def prepare_q4_layers(model: nn.Module, config: EngineConfig) -> set[str]:
    """With `--quantization gguf` on the CPU in bf16: each LinearBase whose checkpoint tensors are all Q4_0 / Q4_1 a
    W4A16 layer ready to be loaded into; returns the HF weight names to read as stored (iterate_gguf_weights'
    `int4`). Elsewhere (the NPU and CUDA have no W4A16 kernel of ours yet) nothing: they are dequantized."""
    if not _q4_as_stored(config):
        return set()
    stored = linear_weights_of_type(config.model_path, Q4_NAMES)
    served = _prepare_stored(model, stored, lambda module: prepare_int4(module, GGUF_GROUP))
    if served:
        logger.info("GGUF: %d Q4 linear weights served as stored (W4A16, %d-weight groups)", len(served), GGUF_GROUP)
    return served


def serve_q8_0_head_as_stored(model: nn.Module, config: EngineConfig) -> bool:
    """With `--quantization gguf` on the CPU in bf16: an LM head whose GGUF tensor is Q8_0 (`output.weight`, or
    `token_embd.weight` when the embeddings are tied) becomes a W8A16 head with the file's q and 32-weight block
    scales and fp32 logits, as NPU_INFER_INT8_LM_HEAD makes one (the tied embedding keeps its dequantized rows for the
    lookup). At batch 1 the bf16 head is as many bytes as a Q4 file's decoder linears."""
    from npu_infer.loaders.gguf_loader import stored_q8_0
    from npu_infer.models.layers.embedding import ParallelLMHead
    from npu_infer.models.layers.int8_linear import make_int8
    if not _q4_as_stored(config):
        return False
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    stored = stored_q8_0(config.model_path, "lm_head.weight") if heads else None
    if stored is None:
        return False
    q, d = stored
    for head in heads:
        rows = head.weight.shape[0]  # this rank's vocabulary slice, padded
        part = slice(head.vocab_start, head.vocab_start + head.shard_size)
        q_rows = torch.zeros(rows, q.shape[1], dtype=torch.int8)
        d_rows = torch.ones(rows, d.shape[1])  # padding rows: q = 0 (their logits are cut off anyway)
        q_rows[:head.shard_size] = q[part]
        d_rows[:head.shard_size] = d[part]
        make_int8(head, "w8a16", q_rows, d_rows)
        head.fp32_logits = True
    logger.info("GGUF: the Q8_0 LM head served as stored (W8A16, %d-weight groups)", GGUF_GROUP)
    return True
