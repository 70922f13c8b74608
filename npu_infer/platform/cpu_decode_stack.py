"""Pure decode steps of a Llama / Qwen2 stack in one C++ call (cpu_decode_stack.cpp's DecodeStack).

The Python layers make ~12 module calls and ~7 kernel calls per layer: at batch 1 that is ~3 ms of a 13 ms step.
DecodeStack makes the same kernel calls in the same order from C++, so its output is bit for bit the Python
path's (the tests check that); it runs only where that holds: bf16 or fp32, one TP rank and one PP stage, every sequence
of the step decoding, at most GEMV_MAX_ROWS of them. Linears may be bf16/fp32 or int8 (W8A8 / W8A16). Everything else takes the Python layers."""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from npu_infer.platform.cpu_attention import KERNEL_HEAD_DIMS
from npu_infer.platform.cpu_linear import GEMV_MAX_ROWS
from npu_infer.worker.context import AttentionMetadata


class CpuDecodeStack:
    def __init__(self, model: nn.Module, kernels: ModuleType):
        """`model` is a LlamaModel holding all layers (their norms and CpuPackedLinear-prepared linears) and the
        rotary table."""
        layers = list(model.layers)
        first = layers[0]
        attn = first.self_attn
        self.layers = layers
        self.stack = kernels.DecodeStack(
            layers=[_layer_weights(layer, kernels) for layer in layers], heads=attn.num_heads,
            kv_heads=attn.num_kv_heads, head_dim=attn.attn.head_dim, eps=first.input_layernorm.eps,
            scale=attn.attn.scale, cos_sin=model.rotary_emb.cos_sin_cache)
        self.caches: list[torch.Tensor] | None = None

    @staticmethod
    def supports(model: nn.Module, dtype: torch.dtype) -> bool:
        """Whether `model` (a LlamaModel, after CpuPlatform.prepare_model) has the shape DecodeStack computes."""
        layers = list(model.layers)
        if dtype not in (torch.bfloat16, torch.float32) or not layers or model.start_layer != 0 or model.end_layer != len(layers):
            return False
        attn = layers[0].self_attn
        linears = [m for layer in layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                   layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        # bitsandbytes linears have no packed weight, nor int8 ones without their kernel: they keep the Python layers.
        return (attn.attn.head_dim in KERNEL_HEAD_DIMS
                and all(getattr(getattr(m, "platform_matmul", None), "runs_in_stack", False) for m in linears)
                and all(m.tp_size == 1 for m in linears))

    def accepts(self, hidden: torch.Tensor, meta: AttentionMetadata) -> bool:
        return meta.num_decodes == hidden.shape[0] <= GEMV_MAX_ROWS and self._bound_caches() is not None

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        nd = meta.num_decodes
        return self.stack.forward(hidden, positions, self.caches, meta.slot_mapping, meta.block_tables[:nd],
                                  meta.seq_lens[:nd])

    def _bound_caches(self) -> list[torch.Tensor] | None:
        """The layers' KV caches, once the worker has allocated them (never during profile_run)."""
        if self.caches is None:
            caches = [layer.self_attn.attn.kv_cache for layer in self.layers]
            if any(c.numel() == 0 for c in caches):
                return None
            self.caches = caches
        return self.caches


def _layer_weights(layer: nn.Module, kernels: ModuleType):
    """One decoder layer's norms and linears as the C++ stack holds them (a LayerWeights)."""
    def stacked(linear: nn.Module):
        return linear.platform_matmul.stack_linear(linear.bias)

    return kernels.LayerWeights(
        input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
        qkv=stacked(layer.self_attn.qkv_proj), o_proj=stacked(layer.self_attn.o_proj),
        gate_up=stacked(layer.mlp.gate_up_proj), down=stacked(layer.mlp.down_proj))
