"""CPU implementations of torch_npu's int8 matmul ops and of the weight-format ops they are used with.

Same contract as ``_ops.py``: torch_npu 2.14.0's parameter names, order, defaults and keyword-only marks
(``declarations.json``), a rejection (:class:`NpuOpRejected`) naming the constraint id of each rule it enforces,
``NotImplementedError`` for features of the real op that are not emulated.

Formats: a device tensor carries its acl format on its storage (``_standin_npu_format``; the base format when
unset: ND, or NCHW / NCDHW for 4-D / 5-D tensors, as torch_npu guesses it).  ``npu_format_cast(w, 29)`` returns a
FRACTAL_NZ copy with the same logical shape and values, as torch_npu's aclnn format cast does (``src.contiguous()``
first); the ops below read the logical values whatever the format, where the format is allowed.

Numerics (torch computes on the CPU; the hardware's own rounding may differ in the last bit):
  npu_dynamic_quant            scale = amax(|x row|) / 127 in fp32, y = round_half_even(x / scale) clamped to +-127
                               (an all-zero row: scale 0 and y 0 -- the docs do not say; x / 0 would be NaN)
  npu_quant_matmul             acc = exact integer x1 @ x2; out = acc * (pertoken_scale[m] * scale[n]) + bias in
                               fp32, rounded once to output_dtype (an int32 bias is added to acc first)
  npu_weight_quant_batchmatmul w = ((weight + antiquant_offset) * antiquant_scale) rounded to x's dtype (the
                               dequantized weight the cube unit multiplies); out = x @ w + bias with fp32 sums
"""

from __future__ import annotations

import torch

from ._ops import OPTIONS, _check, _int, _reject, _tensor, device_op

ND, NCHW, NCDHW, FRACTAL_NZ = 2, 0, 30, 29
FORMAT = "_standin_npu_format"
HALF = (torch.float16, torch.bfloat16)
# torch_npu's int dtype arguments (int? output_dtype ...) take a torch.dtype or its c10::ScalarType number.
SCALAR_TYPES = {1: torch.int8, 3: torch.int32, 5: torch.float16, 6: torch.float32, 15: torch.bfloat16,
                16: torch.quint4x2}
MAX_KN = 65535

CONSTRAINTS_RELIED_ON: dict[str, list[str]] = {
    "npu_dynamic_quant": ["formula", "formula_y", "x_dtype", "x_rank", "dst_type", "outputs"],
    "npu_quant_matmul": [
        "x1_dtype", "x2_dtype", "x_rank", "scale_shape", "pertoken_scale", "bias_shape", "output_dtype",
        "k_n_limit", "combo_scale", "combo_bias", "combo_pertoken", "combo_output", "nz_weight", "meta_k_same",
        "meta_scale_dim", "meta_scale_len", "meta_pertoken_dim", "meta_scale_bf16_out", "meta_bias_bf16_out",
        "meta_bias_fp16_out", "meta_bias_fp16_pertoken", "formula",
    ],
    "npu_weight_quant_batchmatmul": [
        "x_2d", "weight_2d", "weight_a2", "weight_formats", "scale_per_channel", "scale_per_tensor", "scale_dtype",
        "offset_dtype", "scale_offset_shape", "bias_dtype", "bias_dtype_fp16", "bias_shape", "k_n_range",
        "nz_graph_only", "output", "formula",
    ],
    "npu_format_cast": ["acl_format"],
    "get_npu_format": ["no_doc"],
}


def format_of(t: torch.Tensor) -> int:
    """The acl format of ``t``'s storage (what get_npu_format returns)."""
    fmt = getattr(t.untyped_storage(), FORMAT, None)
    if fmt is not None:
        return fmt
    return {4: NCHW, 5: NCDHW}.get(t.dim(), ND)


def _dtype(op: str, name: str, value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}(): argument '{name}' must be int (a torch.dtype is accepted), not "
                        f"{type(value).__name__}")
    if value not in SCALAR_TYPES:
        raise NotImplementedError(f"stand-in {op}: {name}={value} is not emulated")
    return SCALAR_TYPES[value]


def _none(op: str, **kwargs) -> None:
    for name, value in kwargs.items():
        if value is not None:
            raise NotImplementedError(f"stand-in {op}: {name} is not emulated")


# =========================================================================== formats

def npu_format_cast(self, acl_format, *, customize_dtype=None, input_dtype=None):
    op = "npu_format_cast"
    x = _tensor(op, "self", self)
    fmt = _int(op, "acl_format", acl_format)
    _none(op, customize_dtype=customize_dtype, input_dtype=input_dtype)
    if format_of(x) == fmt:
        return x  # "no need to do format cast": the same tensor
    if fmt not in (ND, FRACTAL_NZ):
        raise NotImplementedError(f"stand-in {op}: acl_format {fmt} is not emulated (ND=2, FRACTAL_NZ=29 are)")
    if fmt == FRACTAL_NZ and (x.dim() < 2 or x.dtype not in (torch.int8, *HALF)):
        raise NotImplementedError(f"stand-in {op}: FRACTAL_NZ of a {x.dim()}-D {x.dtype} tensor is not emulated")
    out = x.contiguous().clone()
    setattr(out.untyped_storage(), FORMAT, fmt)
    return out


npu_format_cast.__returns__ = 1


def get_npu_format(self):
    return format_of(_tensor("get_npu_format", "self", self))


get_npu_format.__returns__ = 1


# =========================================================================== W8A8: per-token quantization

def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                      dst_type_max=0.0):
    op = "npu_dynamic_quant"
    x = _tensor(op, "input", input)
    _none(op, smooth_scales=smooth_scales, group_index=group_index)
    dst = _dtype(op, "dst_type", dst_type)
    if dst not in (None, torch.int8):
        raise NotImplementedError(f"stand-in {op}: dst_type {dst} is not emulated (int8 is)")
    if quant_mode != "pertoken" or dst_type_max != 0.0:
        raise NotImplementedError(f"stand-in {op}: quant_mode={quant_mode!r}, dst_type_max={dst_type_max} "
                                  "are not emulated")
    _check(x.dtype in HALF, op, "x_dtype", f"input dtype {x.dtype} is not float16/bfloat16")
    _check(x.dim() > 1, op, "x_rank", f"input must have more than 1 dim, got {x.dim()}")
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = torch.round(xf / safe.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return y, scale


npu_dynamic_quant.__returns__ = 2


# =========================================================================== W8A8: int8 x int8 matmul

def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                     x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                     y_scale=None):
    op = "npu_quant_matmul"
    x1 = _tensor(op, "x1", x1)
    x2 = _tensor(op, "x2", x2)
    scale = _tensor(op, "scale", scale)
    _tensor(op, "offset", offset, optional=True)
    pts = _tensor(op, "pertoken_scale", pertoken_scale, optional=True)
    bias = _tensor(op, "bias", bias, optional=True)
    out_dtype = _dtype(op, "output_dtype", output_dtype) or torch.int8
    _none(op, offset=offset, x1_dtype=x1_dtype, x2_dtype=x2_dtype, pertoken_scale_dtype=pertoken_scale_dtype,
          scale_dtype=scale_dtype, group_sizes=group_sizes, y_scale=y_scale)

    _check(x1.dtype in (torch.int8, torch.int32), op, "x1_dtype", f"x1 dtype {x1.dtype} is not int8/int32")
    _check(x2.dtype == x1.dtype, op, "x2_dtype", f"x2 dtype {x2.dtype} != x1 dtype {x1.dtype}")
    if x1.dtype == torch.int32:
        raise NotImplementedError(f"stand-in {op}: int4 (int32-packed) inputs are not emulated")
    _check(2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6, op, "x_rank",
           f"x1/x2 must have 2-6 dims, got {x1.dim()}/{x2.dim()}")
    if x1.dim() != 2 or x2.dim() != 2:
        raise NotImplementedError(f"stand-in {op}: batched inputs are not emulated")
    (m, k), (k2, n) = x1.shape, x2.shape
    _check(k == k2, op, "meta_k_same",
           f"k dim of x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)} differ: x2 must be [K, N] (the weight "
           "transposed)")
    _check(k <= MAX_KN and n <= MAX_KN, op, "k_n_limit", f"K={k} / N={n} exceed 65535")

    if scale.dtype == torch.int64:
        raise NotImplementedError(f"stand-in {op}: int64 scales (npu_trans_quant_param) are not emulated")
    _check(scale.dtype in (torch.float32, torch.bfloat16), op, "combo_scale",
           f"scale dtype {scale.dtype} is not float32/bfloat16/int64")
    _check(scale.dim() == 1, op, "meta_scale_dim", f"scale must be 1-D, got {tuple(scale.shape)}")
    _check(scale.shape[0] in (1, n), op, "meta_scale_len", f"scale length {scale.shape[0]} is neither 1 nor N={n}")
    _check(out_dtype in (torch.int8, torch.float16, torch.bfloat16, torch.int32), op, "output_dtype",
           f"output_dtype {out_dtype} is not int8/float16/bfloat16/int32")
    if scale.dtype == torch.bfloat16:
        _check(out_dtype in (torch.bfloat16, torch.int32), op, "meta_scale_bf16_out",
               f"a bfloat16 scale needs output_dtype bfloat16 or int32, got {out_dtype}")
    if pts is not None:
        _check(pts.dtype == torch.float32, op, "pertoken_scale", f"pertoken_scale dtype {pts.dtype} != float32")
        _check(pts.dim() == 1, op, "meta_pertoken_dim", f"pertoken_scale must be 1-D, got {tuple(pts.shape)}")
        _check(pts.shape[0] == m, op, "pertoken_scale", f"pertoken_scale length {pts.shape[0]} != M={m}")
        _check(out_dtype in HALF, op, "combo_pertoken",
               f"with pertoken_scale the output must be float16/bfloat16, got {out_dtype}")
        if out_dtype == torch.float16:
            _check(scale.dtype == torch.float32, op, "combo_scale", "a float16 output with pertoken_scale needs a "
                   f"float32 scale, got {scale.dtype}")
    if out_dtype in (torch.int8, torch.int32):
        raise NotImplementedError(f"stand-in {op}: output_dtype {out_dtype} is not emulated")
    if bias is not None:
        _check(bias.dtype in (torch.int32, torch.bfloat16, torch.float16, torch.float32), op, "combo_bias",
               f"bias dtype {bias.dtype} is not int32/bfloat16/float16/float32")
        _check(bias.dim() == 1 and bias.shape[0] == n, op, "bias_shape",
               f"bias must be [N={n}] for a 2-D output, got {tuple(bias.shape)}")
        if bias.dtype == torch.bfloat16:
            _check(out_dtype == torch.bfloat16, op, "meta_bias_bf16_out",
                   f"a bfloat16 bias needs output_dtype bfloat16, got {out_dtype}")
        if bias.dtype == torch.float16:
            _check(pts is not None, op, "meta_bias_fp16_pertoken", "a float16 bias needs pertoken_scale")
            _check(out_dtype == torch.float16, op, "meta_bias_fp16_out",
                   f"a float16 bias needs output_dtype float16, got {out_dtype}")

    acc = x1.to(torch.int64) @ x2.to(torch.int64)  # exact; |acc| <= 65535 * 127 * 127 < 2**31, so int32 is too
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias.to(torch.int64)
    factor = scale.float()[None, :] if pts is None else pts[:, None] * scale.float()[None, :]
    y = acc.to(torch.float32) * factor
    if bias is not None and bias.dtype != torch.int32:
        y = y + bias.float()
    return y.to(out_dtype)


npu_quant_matmul.__returns__ = 1


# =========================================================================== W8A16: int8 weight, 16-bit x

def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                 quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0,
                                 weight_dtype=None):
    op = "npu_weight_quant_batchmatmul"
    x = _tensor(op, "x", x)
    w = _tensor(op, "weight", weight)
    scale = _tensor(op, "antiquant_scale", antiquant_scale)
    offset = _tensor(op, "antiquant_offset", antiquant_offset, optional=True)
    bias = _tensor(op, "bias", bias, optional=True)
    group = _int(op, "antiquant_group_size", antiquant_group_size)
    _int(op, "inner_precise", inner_precise)
    _none(op, quant_scale=quant_scale, quant_offset=quant_offset, weight_dtype=weight_dtype)

    _check(x.dtype in HALF, op, "x_2d", f"x dtype {x.dtype} is not float16/bfloat16")
    _check(x.dim() == 2, op, "x_2d", f"x must be (M, K), got {tuple(x.shape)}")
    _check(w.dtype in (torch.int8, torch.int32), op, "weight_a2", f"weight dtype {w.dtype} is not int8/int32")
    if w.dtype == torch.int32:
        raise NotImplementedError(f"stand-in {op}: int4 (int32-packed) weights are not emulated")
    _check(w.dim() == 2, op, "weight_2d", f"weight must be (K, N), got {tuple(w.shape)}")
    _check(format_of(w) in (ND, FRACTAL_NZ), op, "weight_formats", f"weight format {format_of(w)} is not ND/NZ")
    if format_of(w) == FRACTAL_NZ and not OPTIONS["wqbmm_nz"]:
        _reject(op, "nz_graph_only", "a FRACTAL_NZ weight is supported in graph mode only (strict reading of the "
                "documentation; see configure(wqbmm_nz=...))")
    k, (k2, n) = x.shape[1], w.shape
    _check(k == k2, op, "weight_2d", f"x {tuple(x.shape)} and weight {tuple(w.shape)} disagree on K: weight must be "
           "(K, N) (the [N, K] weight transposed)")
    _check(1 <= k <= MAX_KN and 1 <= n <= MAX_KN, op, "k_n_range", f"K={k} / N={n} outside [1, 65535]")

    if scale.dtype == torch.int64:
        raise NotImplementedError(f"stand-in {op}: int64 antiquant_scale is not emulated")
    _check(scale.dtype == x.dtype, op, "scale_dtype", f"antiquant_scale dtype {scale.dtype} != x dtype {x.dtype}")
    shape = tuple(scale.shape)
    if group:  # per-group (torch_npu's LinearWeightQuant: a multiple of 32 in [32, K - 1]; scale (ceil(K / G), N))
        _check(group % 32 == 0 and 32 <= group <= k - 1, op, "antiquant_group_size",
               f"antiquant_group_size {group} must be a multiple of 32 in [32, K - 1] with K={k}")
        _check(shape == (-(-k // group), n), op, "scale_per_group",
               f"per-group antiquant_scale must be (ceil(K / {group}), N) = {(-(-k // group), n)}, got {shape}")
    else:
        _check(shape in ((1,), (1, 1), (n,), (1, n)), op, "scale_per_channel",
               f"antiquant_scale must be (N,)/(1, N) per channel or (1,)/(1, 1) per tensor with N={n}, got {shape}")
    if offset is not None:
        _check(offset.dtype == scale.dtype, op, "offset_dtype",
               f"antiquant_offset dtype {offset.dtype} != antiquant_scale dtype {scale.dtype}")
        _check(tuple(offset.shape) == shape, op, "scale_offset_shape",
               f"antiquant_offset shape {tuple(offset.shape)} != antiquant_scale shape {shape}")
    if bias is not None:
        want = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
        _check(bias.dtype == want, op, "bias_dtype" if x.dtype == torch.bfloat16 else "bias_dtype_fp16",
               f"with x {x.dtype} the bias must be {want}, got {bias.dtype}")
        _check(tuple(bias.shape) in ((n,), (1, n)) and bias.is_contiguous(), op, "bias_shape",
               f"bias must be a contiguous (N,) or (1, N) with N={n}, got {tuple(bias.shape)}")

    if group:  # row k of the [K, N] weight takes row k // G of the scales (and offsets)
        scale, offset = (t if t is None else t.repeat_interleave(group, dim=0)[:k] for t in (scale, offset))
    wf = w.float() if offset is None else w.float() + offset.float().reshape(-1, n)
    w_deq = (wf * scale.float().reshape(-1, n)).to(x.dtype)
    y = x.float() @ w_deq.float()
    if bias is not None:
        y = y + bias.float().reshape(-1)
    return y.to(x.dtype)


npu_weight_quant_batchmatmul.__returns__ = 1


ALL_OPS = {f.__name__: device_op(f) for f in (npu_format_cast, get_npu_format, npu_dynamic_quant,
                                               npu_quant_matmul, npu_weight_quant_batchmatmul)}
