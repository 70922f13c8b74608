"""Linear layers whose weight bitsandbytes holds: LLM.int8 rows, or 4-bit (nf4 / fp4) blocks — TP-shaped like the
layer each replaces (a row-parallel one still adds its bias on TP rank 0 only and all-reduces)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from npu_infer.distributed.parallel_state import get_tp_group
from npu_infer.models.layers.linear import LinearBase, RowParallelLinear

BNB_MODES = ("nf4", "fp4", "int8")


class _DropCastWarning(logging.Filter):
    """LLM.int8 quantizes activations from fp16 and bnb logs so on every call for other dtypes: drop that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in str(record.msg)


_bnb_matmul_logger = logging.getLogger("bitsandbytes.autograd._functions")
if not any(isinstance(f, _DropCastWarning) for f in _bnb_matmul_logger.filters):
    _bnb_matmul_logger.addFilter(_DropCastWarning())


class BnbLinear(nn.Module):
    def __init__(self, layer: LinearBase, mode: str, threshold: float = 6.0, blocksize: int = 64,
                 double_quant: bool = False):
        super().__init__()
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
        if mode not in BNB_MODES:
            raise ValueError(f"unknown bitsandbytes mode {mode!r}; choose one of {', '.join(BNB_MODES)}")
        weight = layer.weight.data
        self.mode = mode
        self.out_features, self.in_features = weight.shape
        self.reduce = isinstance(layer, RowParallelLinear)
        self.tp_rank = layer.tp_rank
        self.bias = layer.bias
        if mode == "int8":
            # As bnb's Int8Params: the fp16 weight, one absmax scale per output row.
            cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
            self.weight = nn.Parameter(cb, requires_grad=False)
            self.register_buffer("SCB", scb)
            self.state = bnb.MatmulLtState()
            self.state.CB, self.state.SCB = self.weight.data, self.SCB
            self.state.threshold, self.state.has_fp16_weights, self.state.is_training = threshold, False, False
        else:
            packed, self.quant_state = bnbf.quantize_4bit(weight.contiguous(), blocksize=blocksize,
                                                          compress_statistics=double_quant, quant_type=mode)
            self.weight = nn.Parameter(packed, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb
        bias = self.bias if not self.reduce or self.tp_rank == 0 else None
        if self.mode == "int8":
            y = bnb.matmul(x, self.weight, bias=bias, state=self.state)
        else:
            y = bnb.matmul_4bit(x, self.weight.t(), self.quant_state, bias=bias)
        return get_tp_group().all_reduce(y) if self.reduce else y

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as the matmul sees it (for tests and debugging)."""
        import bitsandbytes.functional as bnbf
        if self.mode == "int8":
            return bnbf.int8_vectorwise_dequant(self.weight.data, self.SCB)
        return bnbf.dequantize_4bit(self.weight.data, self.quant_state)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def quantize_linears(model: nn.Module, mode: str, threshold: float = 6.0, blocksize: int = 64,
                     double_quant: bool = False, skip: tuple[str, ...] = ()) -> int:
    """Replace every loaded LinearBase of `model` (except names containing a `skip` entry) by a BnbLinear;
    returns how many were replaced. The full-precision weights are freed layer by layer."""
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, LinearBase) and not any(s in full for s in skip):
                setattr(parent, child_name, BnbLinear(child, mode, threshold, blocksize, double_quant))
                count += 1
    return count
