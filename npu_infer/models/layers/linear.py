"""Linear layers already shaped for tensor parallelism: each knows how to slice its shard while loading."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from npu_infer.distributed.parallel_state import get_tp_group
from npu_infer.models.layers.int8_linear import int8_linear, make_int8, quantize_weight

logger = logging.getLogger(__name__)


def _default_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape {tuple(loaded.shape)} does not match the model's {tuple(param.shape)}")
    param.data.copy_(loaded)


class LinearBase(nn.Module):
    # Set by the platform after loading when it has a faster kernel for this weight: (x, bias) -> x @ W.T + bias
    # (on CPU: bf16 weights packed for oneDNN and for the decode GEMV, platform/cpu_linear.py).
    platform_matmul: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None):
        super().__init__()
        self.tp_dim = tp_dim
        self.tp_rank = get_tp_group().rank_in_group
        self.tp_size = get_tp_group().world_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        _default_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self, self.bias)


def linear(x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ layer.weight.T + bias, through the platform's kernel when it set one (int8 layers: their plain-torch
    twin otherwise, int8_linear.py)."""
    if layer.platform_matmul is not None:
        return layer.platform_matmul(x, bias)
    if getattr(layer, "quant_scheme", None) is not None:
        return int8_linear(x, layer, bias, torch.float32 if getattr(layer, "fp32_logits", False) else None)
    return F.linear(x, layer.weight, bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across TP ranks; no communication."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        tp_size = get_tp_group().world_size
        if output_size % tp_size:
            raise ValueError(f"output size {output_size} does not divide by tensor parallel size {tp_size}")
        super().__init__(input_size, output_size // tp_size, bias, 0)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        shard = param.shape[0]
        _default_loader(param, loaded.narrow(0, self.tp_rank * shard, shard))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate+up); shard_id says which part is loaded."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        target = param.data.narrow(0, offset, size)
        _default_loader(target, loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matmul. With fewer KV heads than TP ranks, KV heads are replicated."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp_size = get_tp_group().world_size
        if num_heads % tp_size:
            raise ValueError(f"{num_heads} attention heads do not divide by tensor parallel size {tp_size}")
        if num_kv_heads % tp_size and tp_size % num_kv_heads:
            raise ValueError(f"{num_kv_heads} KV heads neither divide by nor divide tensor parallel size {tp_size}")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)
        output = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str = "q") -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank = 0, q_size, self.tp_rank
        else:
            offset = q_size + (0 if shard_id == "k" else kv_size)
            size, rank = kv_size, self.tp_rank // self.kv_replicas
        target = param.data.narrow(0, offset, size)
        _default_loader(target, loaded.narrow(0, rank * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across TP ranks; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        tp_size = get_tp_group().world_size
        if input_size % tp_size:
            raise ValueError(f"input size {input_size} does not divide by tensor parallel size {tp_size}")
        super().__init__(input_size // tp_size, output_size, bias, 1)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.ndim == 1:  # the bias is added once, after the reduction
            _default_loader(param, loaded)
            return
        shard = param.shape[1]
        _default_loader(param, loaded.narrow(1, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self, self.bias if self.tp_rank == 0 else None)
        return get_tp_group().all_reduce(y)


def quantize_linears_int8(model: nn.Module, scheme: str, group_size: int | None = None) -> int:
    """Quantize every loaded LinearBase of `model` not int8 already (GGUF Q8_0) in place (weight -> int8 + fp32
    scales); returns how many.

    `group_size` (w8a16 only): one scale per that many input channels where it divides a layer's K; a layer whose
    K it does not divide keeps one scale per output channel (logged), as does every layer with None."""
    if group_size is not None and scheme != "w8a16":
        raise ValueError(f"group-wise scales are for w8a16 only; {scheme} takes one scale per output channel")
    count, per_channel, linears = 0, [], 0
    for name, module in model.named_modules():
        linears += isinstance(module, LinearBase)
        if isinstance(module, LinearBase) and getattr(module, "quant_scheme", None) is None:
            k = module.weight.shape[1]
            group = group_size if group_size is not None and k % group_size == 0 else None
            if group_size is not None and group is None:
                per_channel.append(f"{name} (K = {k})")
            make_int8(module, scheme, *quantize_weight(module.weight.data, group))
            count += 1
    if linears == 0:
        raise ValueError(f"--quantization {scheme} found no linear layers to quantize in this model")
    if per_channel:
        logger.warning("group size %d does not divide the input features of %d linear layers, which keep one scale "
                       "per output channel: %s", group_size, len(per_channel), ", ".join(per_channel[:4]))
    logger.info("quantized %d linear layers to %s (%s)", count, scheme,
                f"group size {group_size}" if group_size else "per channel")
    return count
