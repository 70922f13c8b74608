"""Group-wise W8A16 (one fp32 scale per G input channels): the kernel of cpu_int8_kernels.cpp and the plain-torch
twin against a float64 reference written here (each group's sum times its scale), the C++ decode stack against the
Python layers, the engine through the kernels against the twin path, and the errors for bad input."""
from __future__ import annotations

import pytest
import torch

from conftest import cpu_has_kernel_flags
from npu_infer.models.layers import int8_linear
from npu_infer.models.layers.int8_linear import make_int8, quantize_weight
from npu_infer.platform import cpu_kernels, cpu_linear
from npu_infer.platform.cpu_linear import CpuInt8Linear

HAS_KERNELS = cpu_has_kernel_flags()
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="this CPU lacks AVX-512 BF16")
# (rows, K, N, G): SmolLM2's shapes; K not a multiple of 64 (96, 160, 40); N off the 64-row panels; 1 to 4 rows in
# registers, more through the bf16 scratch panel; one group (G = K) and groups of 2 at the edges.
SHAPES = [(1, 576, 960, 32), (1, 576, 960, 64), (1, 1536, 576, 128), (3, 96, 70, 32), (4, 160, 130, 32),
          (5, 192, 200, 64), (64, 576, 1536, 64), (300, 96, 64, 32), (300, 384, 70, 128), (3, 40, 33, 2),
          (4, 64, 64, 64)]


@pytest.fixture(scope="module")
def kernels():
    return cpu_kernels.load()


def make_case(rows: int, k: int, n: int, group: int, seed: int = 0):
    """Weights whose groups differ in size by up to 100x, so a scale applied to the wrong group shows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k // group, group, generator=g) * torch.rand(n, k // group, 1, generator=g).mul(10).add(0.1)
    wq, scale = quantize_weight(w.reshape(n, k), group)
    scale = scale if scale.dim() == 2 else scale[:, None]  # G = K: one group, still the group-wise layout
    x = (torch.randn(rows, k, generator=g) * 3).bfloat16()
    return x, wq, scale, torch.randn(n, generator=g)


def reference(x, wq, scale, bias):
    """sum over groups of (x . q over the group) * scale[n, g] (+ bias), in float64."""
    rows, k = x.shape
    n, groups = scale.shape
    part = torch.einsum("mgk,ngk->mng", x.double().reshape(rows, groups, k // groups),
                        wq.double().reshape(n, groups, k // groups))
    y = (part * scale.double()).sum(-1)
    return y + bias.double() if bias is not None else y


@needs_kernels
@pytest.mark.parametrize("rows,k,n,group", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_group_wise_w8a16_kernel_is_the_reference_to_fp32_rounding(kernels, rows, k, n, group, bias, monkeypatch):
    x, wq, scale, b = make_case(rows, k, n, group)
    b = b if bias else None
    want = reference(x, wq, scale, b)
    tol = dict(rtol=1e-5, atol=1e-5 * want.abs().max().item())
    lin = CpuInt8Linear(wq, scale, "w8a16", kernels, torch.bfloat16)
    assert lin.packed is not None and lin.scale_padded.shape == (-(-n // 64), k // group, 64)
    got = kernels.linear_w8a16(x, lin.packed, lin.scale_padded, n, b, True)  # fp32 out: no final rounding
    torch.testing.assert_close(got.double(), want, **tol)
    twin = int8_linear.w8a16_linear(x, wq, scale, b, torch.float32)  # the plain-torch twin
    torch.testing.assert_close(twin.double(), want, **tol)
    bf16 = dict(rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())
    monkeypatch.setattr(cpu_linear, "W8A16_KERNEL_MAX_ROWS", 1 << 30)
    out = lin(x, b.bfloat16() if b is not None else None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, **bf16)
    monkeypatch.setattr(cpu_linear, "W8A16_KERNEL_MAX_ROWS", 0)  # many rows: bf16 weight with group scales + oneDNN
    torch.testing.assert_close(lin(x, b.bfloat16() if b is not None else None).double(), want, rtol=2 ** -6,
                               atol=2 ** -6 * want.abs().max().item())


@needs_kernels
def test_per_channel_scales_still_take_the_per_channel_layout(kernels):
    x, wq, scale, b = make_case(3, 96, 70, 96)
    lin = CpuInt8Linear(wq, scale[:, 0], "w8a16", kernels, torch.bfloat16)
    assert lin.scale_padded.shape == (128,)
    got = kernels.linear_w8a16(x, lin.packed, lin.scale_padded, 70, b, True)
    want = reference(x, wq, scale, b)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_group_quantization_is_symmetric_per_group():
    w = torch.tensor([[1.0, -2.0, 100.0, 50.0], [0.0, 0.0, 3.0, -1.5]])
    q, scale = quantize_weight(w, 2)
    assert torch.equal(scale, torch.tensor([[2 / 127, 100 / 127], [1.0, 3 / 127]]))
    assert torch.equal(q, torch.tensor([[64, -127, 127, 64], [0, 0, 127, -64]], dtype=torch.int8))
    q1, s1 = quantize_weight(w, 4)  # G = K is per channel: scale [N]
    assert s1.shape == (2,) and torch.equal((q1, s1)[0], quantize_weight(w)[0])


def _layer():
    from npu_infer.distributed.parallel_state import init_model_parallel
    from npu_infer.models.layers.linear import ColumnParallelLinear
    init_model_parallel(1, 1, 0)
    return ColumnParallelLinear(64, 4)


def test_a_group_size_that_does_not_divide_k_is_one_clear_error():
    with pytest.raises(ValueError, match="group size 48 does not divide the 64 input features.*use a divisor of 64 "
                                         "\\(32, 64\\)"):
        quantize_weight(torch.randn(4, 64), 48)
    with pytest.raises(ValueError, match="scales \\(4, 5\\) do not split the 64 input features into whole groups"):
        make_int8(_layer(), "w8a16", torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 5))
    with pytest.raises(ValueError, match="one scale per output row \\[N\\] or per group"):
        make_int8(_layer(), "w8a16", torch.zeros(4, 64, dtype=torch.int8), torch.ones(3, 2))


def test_group_scales_for_w8a8_are_one_clear_error():
    with pytest.raises(ValueError, match="w8a8 takes one scale per output channel"):
        make_int8(_layer(), "w8a8", torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2))


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0, float("inf")])
def test_a_corrupt_group_scale_is_one_clear_error(bad):
    scale = torch.ones(4, 2)
    scale[3, 1] = bad
    with pytest.raises(ValueError, match="scales must be finite and positive"):
        make_int8(_layer(), "w8a16", torch.zeros(4, 64, dtype=torch.int8), scale)


@needs_kernels
def test_misshapen_group_scales_are_refused_by_the_kernel(kernels):
    x, wq, scale, _ = make_case(1, 96, 70, 32)
    lin = CpuInt8Linear(wq, scale, "w8a16", kernels, torch.bfloat16)
    for bad in (torch.ones(2, 5, 64), torch.ones(2, 3, 32), torch.ones(1, 3, 64), torch.ones(2, 3, 64).double()):
        with pytest.raises(RuntimeError, match="group-wise w_scale must be contiguous fp32 \\[2, groups, 64\\]"):
            kernels.linear_w8a16(x, lin.packed, bad, 70, None, True)


def test_an_odd_group_size_setting_is_one_clear_error(monkeypatch):
    from npu_infer import envs
    monkeypatch.setenv("NPU_INFER_W8A16_GROUP_SIZE", "33")
    with pytest.raises(ValueError, match="NPU_INFER_W8A16_GROUP_SIZE='33' is not an even number"):
        envs.NPU_INFER_W8A16_GROUP_SIZE
    monkeypatch.setenv("NPU_INFER_W8A16_GROUP_SIZE", "channel")
    assert envs.NPU_INFER_W8A16_GROUP_SIZE == 0


# ---------------------------------------------------------------------------------------------------------------
def _group_scales_of(llm) -> set[tuple[int, ...]]:
    model = llm.engine.executor.worker.model
    return {tuple(m.weight_scale.shape) for m in model.modules() if getattr(m, "quant_scheme", None)}


@needs_kernels
def test_decode_stack_with_group_wise_layers_gives_the_python_layers_bits(tiny_llama_dir, monkeypatch):
    from cpu_fallback.test_int8 import PROMPTS, generate
    import npu_infer.platform as platform
    monkeypatch.setenv("NPU_INFER_W8A16_GROUP_SIZE", "32")
    results = {}
    for stack in ("1", "0"):
        monkeypatch.setenv("NPU_INFER_CPU_DECODE_STACK", stack)
        platform._current = None
        llm, results[stack] = generate(tiny_llama_dir, "w8a16", PROMPTS)
        assert (llm.engine.executor.worker.model.model.platform_decode is not None) == (stack == "1")
        assert _group_scales_of(llm) == {(128, 2), (64, 2), (256, 2), (64, 4)}  # qkv, o, gate_up, down
    assert results["1"] == results["0"]


def test_engine_with_group_wise_layers_through_the_kernels_agrees_with_the_twin(tiny_llama_dir, monkeypatch):
    """As test_int8's per-channel check: teacher-forced prompt logprobs, the kernels (decode stack included) no less
    exact than the plain-torch twin against transformers' fp32 forward."""
    from conftest import set_cpu_kernels
    from cpu_fallback.test_int8 import prompt_logprobs
    monkeypatch.setenv("NPU_INFER_W8A16_GROUP_SIZE", "32")
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    results = {}
    for path in ("cpu-kernels", "plain-torch"):
        set_cpu_kernels(path == "cpu-kernels")
        try:
            llm, results[path] = prompt_logprobs(tiny_llama_dir, "w8a16", prompt)
        finally:
            set_cpu_kernels(True)
        assert _group_scales_of(llm) == {(128, 2), (64, 2), (256, 2), (64, 4)}
        qkv = llm.engine.executor.worker.model.model.layers[0].self_attn.qkv_proj
        assert (getattr(qkv.platform_matmul, "packed", None) is not None) == (path == "cpu-kernels" and HAS_KERNELS)
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(torch.tensor([prompt]))
    want = ref.logits[0].log_softmax(-1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    errors = {path: (got - want).abs().max().item() for path, got in results.items()}
    assert errors["plain-torch"] < 0.2, errors
    assert errors["cpu-kernels"] <= 1.5 * errors["plain-torch"] + 0.01, errors


@pytest.mark.parametrize("rank", [0, 1])
def test_tp_shards_slice_group_scales_with_their_weights(rank, monkeypatch):
    """As rank `rank` of 2 (groups built in-process, no collectives): a row-parallel layer gets its K / 2 columns and
    their K / 2G group scales, a merged column-parallel one its rows of each part with their scales."""
    from npu_infer.distributed import parallel_state
    from npu_infer.distributed.parallel_state import GroupCoordinator
    from npu_infer.models.layers.int8_linear import dequantize_weight, prepare_int8
    from npu_infer.models.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    monkeypatch.setattr(parallel_state, "_TP", GroupCoordinator([0, 1], rank))
    w = torch.randn(8, 128) * torch.rand(8, 128).mul(10)
    wq, scale = quantize_weight(w, 32)
    row = RowParallelLinear(128, 8)
    prepare_int8(row, "w8a16", 32)
    row.weight.weight_loader(row.weight, wq)
    row.weight_scale.weight_loader(row.weight_scale, scale)
    assert row.weight_scale.shape == (8, 2)
    assert torch.equal(dequantize_weight(row.weight, row.weight_scale),
                       dequantize_weight(wq, scale)[:, rank * 64:(rank + 1) * 64])
    merged = MergedColumnParallelLinear(128, [8, 8])
    prepare_int8(merged, "w8a16", 32)
    for part in (0, 1):
        merged.weight.weight_loader(merged.weight, wq, part)
        merged.weight_scale.weight_loader(merged.weight_scale, scale * (part + 1), part)
    mine = slice(rank * 4, (rank + 1) * 4)
    assert torch.equal(merged.weight_scale, torch.cat([scale[mine], 2 * scale[mine]]))
    assert torch.equal(merged.weight, torch.cat([wq[mine], wq[mine]]))
