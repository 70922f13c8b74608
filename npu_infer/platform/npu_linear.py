"""int8 linear layers (W8A8, W8A16) on Ascend NPUs through torch_npu, with vllm-ascend's conventions
(vllm_ascend/quantization/methods/w8a8_dynamic.py: AscendW8A8DynamicLinearMethod; w8a16.py: AscendW8A16LinearMethod).

Prepared once after loading, on the device (what their process_weights_after_loading does):
  weight   int8 [N, K] -> [K, N] contiguous -> FRACTAL_NZ (npu_format_cast(w, 29), vllm-ascend's maybe_trans_nz)
  w8a8     scale fp32 [N]: npu_quant_matmul's `scale`
  w8a16    scale [N] in the model dtype: npu_weight_quant_batchmatmul's `antiquant_scale` must match x;
           group-wise scales [N, K / G] as [K / G, N] with antiquant_group_size=G (per-group mode, G % 32 == 0)
  bias     fp32 (fp16 for w8a16 in fp16, which the op requires)
Per call (x made 2-D: [tokens, K]):
  w8a8     x_int8, pertoken_scale = npu_dynamic_quant(x)
           y = npu_quant_matmul(x_int8, weight, scale, pertoken_scale=pertoken_scale, bias=bias, output_dtype=x.dtype)
  w8a16    y = npu_weight_quant_batchmatmul(x, weight, antiquant_scale=scale, bias=bias, antiquant_group_size=G or 0)

Where we differ from vllm-ascend: W8A8's scale stays fp32 (vllm-ascend passes it in the model dtype): the result is
then the CPU path's (int8_linear.py) up to the kernel's rounding, and an fp16 output with per-token scales takes
only an fp32 scale. W8A16 passes no antiquant_offset (our weights are symmetric; vllm-ascend passes zeros).

Signatures and constraints: torch_npu 2.14.0, recorded in tests/npu_standin/declarations.json.
"""
from __future__ import annotations

import torch

from npu_infer.platform.torch_npu_import import import_torch_npu

ACL_FORMAT_FRACTAL_NZ = 29  # vllm_ascend.utils.ACL_FORMAT_FRACTAL_NZ


class NpuInt8Linear:
    """x @ (q * scale).T + bias for an int8 LinearBase (int8_linear.py), its tensors prepared for torch_npu."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, scheme: str,
                 dtype: torch.dtype):
        self._npu = import_torch_npu()
        self.scheme = scheme
        self.out_features, self.in_features = weight.shape
        # The kernels read the weight as [K, N]; NZ is the cube unit's native tiling (no relayout per call).
        self.weight = self._npu.npu_format_cast(weight.t().contiguous(), ACL_FORMAT_FRACTAL_NZ)
        if scheme == "w8a8":
            self.scale, bias_dtype = scale.float().contiguous(), torch.float32
        else:
            # Group-wise scales [N, K / G] go as [K / G, N] with antiquant_group_size G (torch_npu's per-group mode).
            self.group = 0 if scale.dim() == 1 else self.in_features // scale.shape[1]
            if self.group and (self.group % 32 or self.group >= self.in_features):
                raise ValueError(f"w8a16 with {self.group}-channel groups: torch_npu's per-group weight "
                                 "dequantization takes a multiple of 32 below K; set NPU_INFER_W8A16_GROUP_SIZE=32, 64, "
                                 "128 or channel")
            self.scale = (scale.t() if self.group else scale).to(dtype).contiguous()
            bias_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        self.bias = bias.detach().to(bias_dtype).contiguous() if bias is not None else None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # `bias` is the layer's own bias or None (a row-parallel layer adds it on TP rank 0 only).
        bias = self.bias if bias is not None else None
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.scheme == "w8a8":
            xq, pertoken_scale = self._npu.npu_dynamic_quant(x2)
            y = self._npu.npu_quant_matmul(xq, self.weight, self.scale, pertoken_scale=pertoken_scale, bias=bias,
                                           output_dtype=x.dtype)
        else:
            y = self._npu.npu_weight_quant_batchmatmul(x2, self.weight, antiquant_scale=self.scale, bias=bias,
                                                       antiquant_group_size=self.group)
        return y.reshape(*lead, self.out_features)
