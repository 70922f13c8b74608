"""The stand-in's int8 ops (_quant_ops.py) against references written here (integer sums, per-element loops), and the
calls the real ops reject: a weight not transposed, a scale or bias of the wrong dtype, a host tensor on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from . import NpuOpRejected, configure

BF16, FP16 = torch.bfloat16, torch.float16


# =========================================================================== references

def ref_dynamic_quant(x: torch.Tensor) -> tuple[list[list[int]], list[float]]:
    """Per row: scale = fp32(amax) / 127 in fp32, q = round-half-even(fp32(x) / scale), one element at a time."""
    rows, scales = [], []
    for row in x.float().numpy():
        scale = np.float32(np.abs(row).max()) / np.float32(127)
        scales.append(float(scale))
        rows.append([0 if scale == 0 else max(-127, min(127, round(float(np.float32(v) / scale)))) for v in row])
    return rows, scales


def ref_quant_matmul(xq, wq_kn, scale, pertoken, bias):
    """Exact integer sums (Python ints), then acc * pertoken[m] * scale[n] + bias in float64."""
    xs, ws = xq.tolist(), wq_kn.tolist()
    m, k, n = len(xs), len(ws), len(ws[0])
    out = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        for j in range(n):
            acc = sum(xs[i][t] * ws[t][j] for t in range(k))
            if bias is not None and bias.dtype == torch.int32:
                acc += int(bias[j])
            out[i, j] = acc * float(pertoken[i]) * float(scale[j])
            if bias is not None and bias.dtype != torch.int32:
                out[i, j] += float(bias[j])
    return out


def int8(shape, seed):
    return torch.randint(-127, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


# =========================================================================== formats

def test_format_cast_to_nz_keeps_shape_and_values(npu):
    w = int8((64, 96), 0)
    assert npu.get_npu_format(w) == 2  # a new 2-D tensor is ND
    assert npu.get_npu_format(torch.zeros(2, 3, 4, 5)) == 0  # 4-D: NCHW, as in torch_npu's own example
    nz = npu.npu_format_cast(w, 29)
    assert npu.get_npu_format(nz) == 29 and npu.get_npu_format(w) == 2
    assert nz.shape == w.shape and torch.equal(nz, w)
    assert npu.npu_format_cast(nz, 29) is nz  # already NZ: the same tensor, as torch_npu returns it
    t = npu.npu_format_cast(w.t(), 29)  # a transposed view is made contiguous first
    assert t.is_contiguous() and torch.equal(t, w.t()) and npu.get_npu_format(t) == 29
    assert npu.get_npu_format(npu.npu_format_cast(nz, 2)) == 2


# =========================================================================== npu_dynamic_quant

def test_dynamic_quant_is_per_token_symmetric_with_round_half_even(npu):
    x = (torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 4).to(BF16)
    x[1] = 0  # an all-zero row
    x[2, :5] = torch.tensor([127.0, 2.5, 3.5, -2.5, 0.5])  # amax 127: scale 1, exact halves
    x[2, 5:] = 0
    q, scale = npu.npu_dynamic_quant(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.dtype == torch.float32 and scale.shape == (6,)
    rows, scales = ref_dynamic_quant(x)
    assert q.tolist() == rows and scale.tolist() == scales
    assert q[2, :5].tolist() == [127, 2, 4, -2, 0]  # ties to even
    q3, s3 = npu.npu_dynamic_quant(x.to(FP16).reshape(2, 3, 50))  # the scale has x's shape without its last dim
    assert q3.shape == (2, 3, 50) and s3.shape == (2, 3)


def test_dynamic_quant_matches_the_cpu_twin(npu):
    from npu_infer.models.layers.int8_linear import quantize_per_token
    x = (torch.randn(33, 70, generator=torch.Generator().manual_seed(2)) * 3).to(BF16)
    q, scale = npu.npu_dynamic_quant(x)
    q_twin, scale_twin = quantize_per_token(x)
    assert torch.equal(q, q_twin) and torch.equal(scale, scale_twin)


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.randn(4, 8), "float16/bfloat16"),            # fp32 input
    (lambda: torch.randn(8).to(BF16), "more than 1 dim"),        # 1-D input
])
def test_dynamic_quant_rejects(npu, bad, match):
    with pytest.raises(NpuOpRejected, match=match):
        npu.npu_dynamic_quant(bad())


# =========================================================================== npu_quant_matmul

@pytest.mark.parametrize("out_dtype", [BF16, FP16])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.int32, "out"])
def test_quant_matmul_is_exact_integer_sums_then_scaled(npu, out_dtype, bias_dtype):
    g = torch.Generator().manual_seed(3)
    m, k, n = 5, 40, 24
    xq, wq = int8((m, k), 4), int8((k, n), 5)
    scale = torch.rand(n, generator=g) / 100 + 1e-3
    pertoken = torch.rand(m, generator=g) / 50 + 1e-3
    bias = None
    if bias_dtype == torch.int32:
        bias = torch.randint(-500, 500, (n,), generator=g, dtype=torch.int32)
    elif bias_dtype is not None:
        bias = torch.randn(n, generator=g).to(out_dtype if bias_dtype == "out" else bias_dtype)
    y = npu.npu_quant_matmul(xq, wq, scale, pertoken_scale=pertoken, bias=bias, output_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    ref = ref_quant_matmul(xq, wq, scale, pertoken, bias)
    torch.testing.assert_close(y.double(), ref.to(out_dtype).double(), rtol=2 ** -7, atol=1e-6)


def test_quant_matmul_with_nz_weight_and_the_output_dtype_as_a_number(npu):
    xq, wq = int8((3, 32), 6), int8((32, 16), 7)
    scale, pertoken = torch.full((16,), 0.01), torch.full((3,), 0.02)
    nd = npu.npu_quant_matmul(xq, wq, scale, pertoken_scale=pertoken, output_dtype=BF16)
    nz = npu.npu_quant_matmul(xq, npu.npu_format_cast(wq, 29), scale, pertoken_scale=pertoken, output_dtype=15)
    assert torch.equal(nd, nz) and nz.dtype == BF16  # 15: c10::ScalarType::BFloat16


def test_quant_matmul_is_the_cpu_twin_bit_for_bit(npu):
    """npu_dynamic_quant + npu_quant_matmul give int8_linear.w8a8_linear's result exactly (same formulas)."""
    from npu_infer.models.layers.int8_linear import quantize_weight, w8a8_linear
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(9, 48, generator=g) * 2).to(BF16)
    wq, w_scale = quantize_weight(torch.randn(40, 48, generator=g))
    bias = torch.randn(40, generator=g).to(BF16)
    xq, pertoken = npu.npu_dynamic_quant(x)
    y = npu.npu_quant_matmul(xq, wq.t().contiguous(), w_scale, pertoken_scale=pertoken, bias=bias.float(),
                             output_dtype=BF16)
    assert torch.equal(y, w8a8_linear(x, wq, w_scale, bias))


def _qmm_case():
    return dict(x1=int8((4, 32), 9), x2=int8((32, 16), 10), scale=torch.full((16,), 0.01),
                pertoken_scale=torch.full((4,), 0.02), output_dtype=BF16)


@pytest.mark.parametrize("change, match", [
    (dict(x2=int8((16, 32), 10)), "meta_k_same"),                              # weight [N, K]: not transposed
    (dict(x2=int8((32, 16), 10).to(torch.int32)), "x2_dtype"),                 # x2 not int8
    (dict(scale=torch.full((16,), 0.01).to(FP16)), "combo_scale"),             # fp16 scale
    (dict(scale=torch.full((16,), 0.01).to(BF16), output_dtype=FP16), "meta_scale_bf16_out"),
    (dict(scale=torch.full((16, 1), 0.01)), "meta_scale_dim"),                 # scale [N, 1] (the checkpoint's)
    (dict(scale=torch.full((15,), 0.01)), "meta_scale_len"),
    (dict(pertoken_scale=torch.full((4,), 0.02).to(BF16)), "pertoken_scale"),  # pertoken not fp32
    (dict(pertoken_scale=torch.full((3,), 0.02)), "pertoken_scale"),
    (dict(output_dtype=torch.int8), "combo_pertoken"),                         # int8 out with pertoken
    (dict(bias=torch.zeros(16, dtype=BF16), output_dtype=FP16), "meta_bias_bf16_out"),
    (dict(bias=torch.zeros(16, dtype=FP16)), "meta_bias_fp16_out"),
    (dict(bias=torch.zeros(8)), "bias_shape"),
    (dict(x1=int8((4, 65536), 9), x2=int8((65536, 16), 10)), "k_n_limit"),
])
def test_quant_matmul_rejects(npu, change, match):
    args = {**_qmm_case(), **change}
    x1, x2, scale = args.pop("x1"), args.pop("x2"), args.pop("scale")
    with pytest.raises(NpuOpRejected, match=match):
        npu.npu_quant_matmul(x1, x2, scale, **args)


# =========================================================================== npu_weight_quant_batchmatmul

@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("offset", [False, True])
def test_weight_quant_batchmatmul_is_x_times_the_dequantized_weight(npu, dtype, offset):
    g = torch.Generator().manual_seed(11)
    m, k, n = 7, 40, 24
    x = torch.randn(m, k, generator=g).to(dtype)
    wq = int8((k, n), 12)
    scale = (torch.rand(n, generator=g) / 50 + 1e-3).to(dtype)
    off = torch.randint(-3, 4, (n,), generator=g).to(dtype) if offset else None
    bias = torch.randn(n, generator=g).to(torch.float32 if dtype == BF16 else FP16)
    y = npu.npu_weight_quant_batchmatmul(x, wq, scale, off, bias=bias)
    assert y.dtype == dtype and y.shape == (m, n)
    # (weight + offset) * scale, element by element, held in x's dtype; then float64 sums.
    w_deq = torch.tensor([[float(wq[t, j]) + (float(off[j]) if offset else 0.0) for j in range(n)]
                          for t in range(k)], dtype=torch.float64) * scale.double()
    ref = x.double() @ w_deq.to(dtype).double() + bias.double()
    torch.testing.assert_close(y.double(), ref.to(dtype).double(), rtol=2 ** -7, atol=1e-3)


def test_weight_quant_batchmatmul_is_close_to_the_cpu_twin(npu):
    from npu_infer.models.layers.int8_linear import quantize_weight, w8a16_linear
    g = torch.Generator().manual_seed(13)
    x = torch.randn(6, 64, generator=g).to(BF16)
    wq, w_scale = quantize_weight(torch.randn(48, 64, generator=g))
    y = npu.npu_weight_quant_batchmatmul(x, npu.npu_format_cast(wq.t().contiguous(), 29), w_scale.to(BF16))
    twin = w8a16_linear(x, wq, w_scale, None)
    # Only the scale's rounding to bf16 (the op takes it in x's dtype) and the dequantized weight's differ.
    torch.testing.assert_close(y.float(), twin.float(), rtol=2 ** -6, atol=2 ** -6 * float(twin.abs().max()))


@pytest.mark.parametrize("group", [32, 64])
def test_per_group_weight_quant_batchmatmul_is_close_to_the_group_wise_twin(npu, group):
    """Group-wise W8A16 (scales [N, K / G]) as torch_npu's per-group mode takes it: scales [K / G, N], G given."""
    from npu_infer.models.layers.int8_linear import quantize_weight, w8a16_linear
    g = torch.Generator().manual_seed(group)
    x = torch.randn(5, 192, generator=g).to(BF16)
    wq, w_scale = quantize_weight(torch.randn(48, 192, generator=g), group)
    assert w_scale.shape == (48, 192 // group)
    y = npu.npu_weight_quant_batchmatmul(x, npu.npu_format_cast(wq.t().contiguous(), 29),
                                         w_scale.t().contiguous().to(BF16), antiquant_group_size=group)
    twin = w8a16_linear(x, wq, w_scale, None)
    torch.testing.assert_close(y.float(), twin.float(), rtol=2 ** -6, atol=2 ** -6 * float(twin.abs().max()))
    with pytest.raises(NpuOpRejected, match="scale_per_group"):  # the [N, K / G] layout, not transposed
        npu.npu_weight_quant_batchmatmul(x, wq.t().contiguous(), w_scale.to(BF16), antiquant_group_size=group)
    with pytest.raises(NpuOpRejected, match="antiquant_group_size"):  # not a multiple of 32
        npu.npu_weight_quant_batchmatmul(x, wq.t().contiguous(), torch.ones(4, 48, dtype=BF16),
                                         antiquant_group_size=48)


def _wqbmm_case():
    return dict(x=torch.randn(4, 32).to(BF16), weight=int8((32, 16), 14), antiquant_scale=torch.full((16,), 0.01,
                dtype=BF16))


@pytest.mark.parametrize("change, match", [
    (dict(weight=int8((16, 32), 14)), "weight_2d"),                              # [N, K]: not transposed
    (dict(antiquant_scale=torch.full((16,), 0.01)), "scale_dtype"),              # fp32 scale with bf16 x
    (dict(antiquant_scale=torch.full((16, 1), 0.01, dtype=BF16)), "scale_per_channel"),  # [N, 1]
    (dict(antiquant_offset=torch.zeros(16)), "offset_dtype"),
    (dict(antiquant_offset=torch.zeros(1, 16, dtype=BF16)), "scale_offset_shape"),
    (dict(bias=torch.zeros(16, dtype=BF16)), "bias_dtype"),                      # bf16 x needs an fp32 bias
    (dict(x=torch.randn(4, 32).to(FP16), antiquant_scale=torch.full((16,), 0.01, dtype=FP16),
          bias=torch.zeros(16)), "bias_dtype_fp16"),
    (dict(x=torch.randn(4, 32)), "x_2d"),                                        # fp32 x
    (dict(x=torch.randn(2, 4, 32).to(BF16)), "x_2d"),                            # 3-D x
])
def test_weight_quant_batchmatmul_rejects(npu, change, match):
    args = {**_wqbmm_case(), **change}
    with pytest.raises(NpuOpRejected, match=match):
        npu.npu_weight_quant_batchmatmul(**args)


def test_nz_weight_in_weight_quant_batchmatmul_under_the_strict_reading(npu):
    args = _wqbmm_case()
    args["weight"] = npu.npu_format_cast(args["weight"], 29)
    npu.npu_weight_quant_batchmatmul(**args)  # the default reading: what vllm-ascend does
    configure(wqbmm_nz=False)
    with pytest.raises(NpuOpRejected, match="nz_graph_only"):
        npu.npu_weight_quant_batchmatmul(**args)


# =========================================================================== device placement

def test_int8_ops_refuse_host_tensors_on_the_strict_device():
    from . import install, strict_device, uninstall
    npu = install(strict=True)
    try:
        dev = strict_device()
        x = dev.tensor(torch.randn(4, 32).to(BF16))
        w = npu.npu_format_cast(dev.tensor(int8((32, 16), 15)), 29)
        scale = dev.tensor(torch.full((16,), 0.01))
        xq, pertoken = npu.npu_dynamic_quant(x)
        assert xq.device.type == "npu" and pertoken.device.type == "npu" and w.device.type == "npu"
        assert npu.npu_quant_matmul(xq, w, scale, pertoken_scale=pertoken, output_dtype=BF16).device.type == "npu"
        with pytest.raises(RuntimeError, match="argument 'scale' is a host tensor"):
            npu.npu_quant_matmul(xq, w, scale.cpu(), pertoken_scale=pertoken, output_dtype=BF16)
        with pytest.raises(RuntimeError, match="argument 'antiquant_scale' is a host tensor"):
            npu.npu_weight_quant_batchmatmul(x, w, torch.full((16,), 0.01, dtype=BF16))
        with pytest.raises(RuntimeError, match="argument 'self' is a host tensor"):
            npu.npu_format_cast(int8((32, 16), 15), 29)
    finally:
        uninstall()
