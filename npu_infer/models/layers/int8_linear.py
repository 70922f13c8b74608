"""int8 linear layers, W8A8 and W8A16, in plain torch: the reference every platform kernel is tested against, and
the path taken where no kernel is.

Weights: symmetric int8, `weight_scale` fp32 [N] (one per output channel: w = q * scale[n]) or, for W8A16 only,
[N, K / G] (one per group of G input channels: w[n, k] = q[n, k] * scale[n, k // G]; GGUF Q8_0 is G = 32).
W8A8: activations quantized per token, dynamically (scale = amax(|row|) / 127), products summed exactly in int32,
then y = acc * (x_scale[m] * w_scale[n]) + bias in fp32, rounded once. W8A16: y = (x . q in fp32) * w_scale[n] + bias
per channel; group-wise, y = x . (q * scale) in fp32 + bias (the kernel: each group's partial sum times its scale,
the same value to fp32 rounding).
Static W8A8 (msmodelslim's "W8A8", as vllm-ascend's AscendW8A8LinearMethod computes it): activations quantized with
one stored scale and offset per tensor, x_q = clamp(round(x / input_scale + input_offset), -128, 127); then
y = (x_q . q + quant_bias) * deq_scale[n], where msmodelslim folded the offset's correction and the layer's float bias
into quant_bias (int32) and input_scale * weight_scale into deq_scale.
The embedding and the LM head are not LinearBase layers: they stay in the model dtype, except the LM head where
NPU_INFER_INT8_LM_HEAD asks for it (embedding.quantize_lm_head_int8)."""
from __future__ import annotations


import torch
from torch import nn

from npu_infer.models.layers.int4_linear import W4A16, w4a16_linear

INT8_SCHEMES = ("w8a8", "w8a16")
W8A8_STATIC = "w8a8_static"  # only from a checkpoint that holds its calibrated activation scales (msmodelslim)


def check_group_size(group_size: int, in_features: int) -> None:
    """A group size must split K into whole groups (what vLLM's compressed-tensors W8A16 and GGUF's blocks do)."""
    if group_size <= 0 or in_features % group_size:
        fits = ", ".join(str(g) for g in (32, 64, 128) if in_features % g == 0) or "none of 32, 64, 128"
        raise ValueError(f"group size {group_size} does not divide the {in_features} input features of this "
                         f"linear; use a divisor of {in_features} ({fits}) or per-channel scales")


def quantize_weight(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], fp32 scale), symmetric: scale [N] per output channel (group_size None or K), or
    [N, K / group_size] per group of input channels."""
    n, k = weight.shape
    if group_size is None or group_size == k:
        group_size = k
    check_group_size(group_size, k)
    w = weight.float().reshape(n, k // group_size, group_size)
    scale = w.abs().amax(dim=2) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w / scale[:, :, None]).clamp(-127, 127).to(torch.int8).reshape(n, k)
    return q, scale[:, 0] if group_size == k else scale


def group_size_of(wq: torch.Tensor, scale: torch.Tensor) -> int:
    """G of an int8 weight [N, K] and its scales: K for per-channel scales [N]."""
    return wq.shape[1] if scale.dim() == 1 else wq.shape[1] // scale.shape[1]


def dequantize_weight(wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q * scale as fp32 [N, K], per channel or per group."""
    n, k = wq.shape
    groups = 1 if scale.dim() == 1 else scale.shape[1]
    return (wq.float().reshape(n, groups, k // groups) * scale.float().reshape(n, groups, 1)).reshape(n, k)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float -> (int8 [M, K], fp32 scale [M]): the twin of the kernels' quantize_per_token."""
    xf = x.float()
    scale = xf.abs().amax(dim=1) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(xf / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int8_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq [M, K] @ wq [N, K]^T as exact int32 (oneDNN's int8 GEMM)."""
    return torch._int_mm(xq, wq.t())


def w8a8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    lead = x.shape[:-1]
    xq, x_scale = quantize_per_token(x.reshape(-1, x.shape[-1]))
    y = int8_matmul(xq, wq).float() * (x_scale[:, None] * w_scale[None, :])
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype).reshape(*lead, wq.shape[0])


def w8a16_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    if w_scale.dim() == 1:
        y = (x.float() @ wq.float().t()) * w_scale
    else:  # group-wise: the weight in fp32 (q * scale, exact to one rounding), then one matmul
        y = x.float() @ dequantize_weight(wq, w_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def w8a8_static_linear(x: torch.Tensor, wq: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor,
                       deq_scale: torch.Tensor, quant_bias: torch.Tensor | None) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()
    xq = torch.round(x2 / input_scale + input_offset).clamp(-128, 127).to(torch.int8)
    acc = int8_matmul(xq, wq)
    if quant_bias is not None:
        acc = acc + quant_bias
    return (acc.float() * deq_scale).to(x.dtype).reshape(*lead, wq.shape[0])


def int8_linear(x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The plain-torch forward of a LinearBase made int8 (quantize_linears_int8, or an int8 checkpoint's loader) or
    W4A16 (a GGUF Q4 file's, int4_linear.py), or of an int8 LM head (quantize_lm_head_int8; out_dtype fp32)."""
    if layer.quant_scheme == W4A16:  # GGUF Q4 as stored (int4_linear.py)
        return w4a16_linear(x, layer.weight, layer.weight_scale, layer.weight_min, bias, out_dtype)
    if layer.quant_scheme == W8A8_STATIC:
        # The float bias is in quant_bias; a row-parallel layer adds it on TP rank 0 only, as it does a bias.
        first = layer.tp_dim != 1 or layer.tp_rank == 0
        return w8a8_static_linear(x, layer.weight, layer.input_scale, layer.input_offset, layer.deq_scale,
                                  layer.quant_bias if first else None)
    fn = w8a8_linear if layer.quant_scheme == "w8a8" else w8a16_linear
    return fn(x, layer.weight, layer.weight_scale, bias, out_dtype)


def make_int8(layer: nn.Module, scheme: str, wq: torch.Tensor, scale: torch.Tensor) -> None:
    """Hold `wq` (int8 [N, K]) and `scale` (fp32 [N], or [N, K / G] for w8a16) as the weight of the LinearBase
    `layer`."""
    if scheme not in INT8_SCHEMES:
        raise ValueError(f"unknown int8 scheme {scheme!r}; choose one of {', '.join(INT8_SCHEMES)}")
    if wq.dtype != torch.int8 or wq.dim() != 2 or scale.dim() not in (1, 2) or scale.shape[0] != wq.shape[0]:
        raise ValueError(f"int8 weight [N, K] with one scale per output row [N] or per group [N, K / G] expected, "
                         f"got {tuple(wq.shape)} {wq.dtype} and scale {tuple(scale.shape)}")
    if scale.dim() == 2:
        if scheme != "w8a16":
            raise ValueError(f"{scheme} takes one scale per output channel [N]; group-wise scales "
                             f"{tuple(scale.shape)} are for w8a16 only")
        if scale.shape[1] == 0 or wq.shape[1] % scale.shape[1]:
            raise ValueError(f"scales {tuple(scale.shape)} do not split the {wq.shape[1]} input features into "
                             "whole groups")
    scale = scale.float()
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise ValueError("int8 weight scales must be finite and positive")
    layer.weight = nn.Parameter(wq, requires_grad=False)
    layer.weight_scale = nn.Parameter(scale.contiguous(), requires_grad=False)
    layer.quant_scheme = scheme


def make_int8_static(layer: nn.Module, n: int, k: int, device: torch.device) -> None:
    """Give the LinearBase `layer` static W8A8's tensors, to be filled by a checkpoint: weight int8 [N, K], deq_scale
    fp32 [N] and quant_bias int32 [N] (sliced like a bias), input_scale and input_offset fp32 [1] (whole on every
    rank)."""
    layer.weight = nn.Parameter(torch.zeros(n, k, dtype=torch.int8, device=device), requires_grad=False)
    layer.deq_scale = nn.Parameter(torch.ones(n, device=device), requires_grad=False)
    layer.quant_bias = nn.Parameter(torch.zeros(n, dtype=torch.int32, device=device), requires_grad=False)
    layer.input_scale = nn.Parameter(torch.ones(1, device=device), requires_grad=False)
    layer.input_offset = nn.Parameter(torch.zeros(1, device=device), requires_grad=False)
    layer.quant_scheme = W8A8_STATIC


def prepare_int8(layer: nn.Module, scheme: str, group_size: int | None = None) -> None:
    """Give the LinearBase `layer` an int8 weight and fp32 scales ([N], or [N, K / group_size]) for a checkpoint to
    be loaded into, TP-sliced by the layer's own weight_loader: the scales like the weight (along N for
    column-parallel; row-parallel: per-group scales along K / G, per-channel ones kept whole like a bias)."""
    n, k = layer.weight.shape
    if group_size is not None:
        check_group_size(group_size, k)
    device = layer.weight.device
    scale = torch.ones(n, device=device) if group_size is None else torch.ones(n, k // group_size, device=device)
    make_int8(layer, scheme, torch.zeros(n, k, dtype=torch.int8, device=device), scale)
    layer.weight.weight_loader = layer.weight_loader
    layer.weight_scale.weight_loader = layer.weight_loader


def check_int8_scales(model: nn.Module) -> None:
    """After loading: a scale that is NaN, infinite, zero or negative fails here, by layer name."""
    for name, module in model.named_modules():
        scale = getattr(module, "weight_scale", None) if getattr(module, "quant_scheme", None) in INT8_SCHEMES else None
        if scale is not None and (not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any())):
            raise ValueError(f"{name}.weight_scale: int8 weight scales must be finite and positive; the checkpoint "
                             "is corrupt")
