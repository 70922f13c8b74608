"""W4A16 linear layers in plain torch: GGUF Q4_0 / Q4_1 weights served as stored, the reference the CPU kernel
(cpu_int4_kernels.cpp) is tested against and the path taken where no kernel is.

A layer holds `weight` uint8 [N, K] (q in 0..15, one byte each), `weight_scale` d and `weight_min` m fp32 [N, K / G]
(G = 32, GGUF's block): w[n, k] = d[n, k // G] * q[n, k] + m[n, k // G]. Q4_1 stores d and m (fp16); Q4_0 stores d
with q - 8, so m = -8 d. y = x . w in fp32 (+ bias), rounded once; the kernel sums each group's x . q in fp32 and
applies d and m once a group (the same value up to fp32 summation order)."""
from __future__ import annotations

import torch
from torch import nn

W4A16 = "w4a16"
Q4_GROUP = 32


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """d * q + m as fp32 [N, K]."""
    n, k = q.shape
    groups = scale.shape[1]
    w = q.float().reshape(n, groups, k // groups) * scale.float()[:, :, None] + mins.float()[:, :, None]
    return w.reshape(n, k)


def w4a16_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    y = x.float() @ dequantize_int4(q, scale, mins).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] (0..15) -> uint8 [ceil(N / 64), K / 2, 64], the CPU kernel's panels: step s of panel p holds
    rows p * 64.. x k pair (2s, 2s + 1) as 128 values in bf16-panel order (v = row * 2 + kk); byte i of half h
    (32 bytes) carries value h * 64 + i in its low nibble and h * 64 + 32 + i in its high one."""
    n, k = q.shape
    if k % 2:
        raise ValueError(f"pack_int4: K must be even, got {k}")
    panels = -(-n // 64)
    padded = torch.zeros(panels * 64, k, dtype=torch.uint8)
    padded[:n] = q
    values = padded.view(panels, 64, k // 2, 2).permute(0, 2, 1, 3).reshape(panels, k // 2, 2, 2, 32)
    return (values[:, :, :, 0] | (values[:, :, :, 1] << 4)).reshape(panels, k // 2, 64).contiguous()


def panel_layout(t: torch.Tensor) -> torch.Tensor:
    """Per-group fp32 [N, G] -> [panels, G, 64] (a panel's 64 rows of one group side by side), zero-padded rows."""
    n, groups = t.shape
    panels = -(-n // 64)
    padded = torch.zeros(panels * 64, groups)
    padded[:n] = t.float()
    return padded.reshape(panels, 64, groups).transpose(1, 2).contiguous()


def prepare_int4(layer: nn.Module, group_size: int = Q4_GROUP) -> None:
    """Give the LinearBase `layer` W4A16 tensors (uint8 q, fp32 d and m [N, K / G]) for a checkpoint to be loaded
    into, sliced by the layer's own weight_loader (d and m like a group-wise W8A16 scale)."""
    n, k = layer.weight.shape
    if k % group_size:
        raise ValueError(f"W4A16: group size {group_size} does not divide the {k} input features")
    device = layer.weight.device
    layer.weight = nn.Parameter(torch.zeros(n, k, dtype=torch.uint8, device=device), requires_grad=False)
    layer.weight_scale = nn.Parameter(torch.ones(n, k // group_size, device=device), requires_grad=False)
    layer.weight_min = nn.Parameter(torch.zeros(n, k // group_size, device=device), requires_grad=False)
    for p in (layer.weight, layer.weight_scale, layer.weight_min):
        p.weight_loader = layer.weight_loader
    layer.quant_scheme = W4A16


def check_int4(model: nn.Module) -> None:
    """After loading: q above 15 or a scale / min that is NaN or infinite fails here, by layer name."""
    for name, module in model.named_modules():
        if getattr(module, "quant_scheme", None) != W4A16:
            continue
        if int(module.weight.max()) > 15:
            raise ValueError(f"{name}.weight: W4A16 values must be 0..15; the checkpoint is corrupt")
        for part in ("weight_scale", "weight_min"):
            if not bool(torch.isfinite(getattr(module, part)).all()):
                raise ValueError(f"{name}.{part}: W4A16 scales and mins must be finite; the checkpoint is corrupt")
