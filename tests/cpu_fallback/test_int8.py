"""int8 linears (W8A8, W8A16): the kernels of cpu_int8_kernels.cpp against an integer reference written here
(exact int64 sums, then the documented scale math), the engine under each scheme through the kernels against its
plain-torch twin path, and the errors for bad input."""
from __future__ import annotations

import pytest
import torch

from conftest import cpu_has_kernel_flags
from npu_infer.models.layers import int8_linear
from npu_infer.models.layers.int8_linear import make_int8, quantize_weight
from npu_infer.platform import cpu_kernels, cpu_linear
from npu_infer.platform.cpu_linear import CpuInt8Linear

FLAGS = cpu_kernels.cpu_flags()
HAS_KERNELS = cpu_has_kernel_flags()
HAS_VNNI = HAS_KERNELS and "avx512_vnni" in FLAGS
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="this CPU lacks AVX-512 BF16")
needs_vnni = pytest.mark.skipif(not HAS_VNNI, reason="this CPU lacks AVX512-VNNI")
# (rows, K, N): SmolLM2's shapes, odd K (padded to the VNNI group of 4), N off the 64-row panels, > 1 pass of rows.
SHAPES = [(1, 576, 960), (3, 37, 70), (5, 100, 130), (17, 64, 200), (64, 576, 1536), (300, 40, 64)]


@pytest.fixture(scope="module")
def kernels():
    return cpu_kernels.load()


def reference_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8, written out from the definition (float64 for the division, as round() sees it)."""
    amax = x.float().abs().amax(dim=1)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / 127)
    q = torch.round(x.float() / scale[:, None]).clamp(-127, 127)
    return q.to(torch.int64), scale


def reference_w8a8(x, wq, w_scale, bias, out_dtype):
    xq, x_scale = reference_quantize(x)
    acc = xq @ wq.to(torch.int64).t()  # exact
    y = acc.to(torch.float32) * (x_scale[:, None] * w_scale[None, :])
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def make_case(rows, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=g) * 3).bfloat16()
    x[0, :] = 0 if rows > 2 else x[0, :]  # an all-zero row: scale 1, not a division by zero
    wq, w_scale = quantize_weight(torch.randn(n, k, generator=g))
    return x, wq, w_scale, torch.randn(n, generator=g)


@needs_vnni
@pytest.mark.parametrize("rows,k,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_w8a8_kernel_is_the_integer_reference_bit_for_bit(kernels, rows, k, n, bias, monkeypatch):
    x, wq, w_scale, b = make_case(rows, k, n)
    b = b if bias else None
    lin = CpuInt8Linear(wq, w_scale, "w8a8", kernels, torch.bfloat16)
    want = reference_w8a8(x, wq, w_scale, b, torch.bfloat16)
    monkeypatch.setattr(cpu_linear, "W8A8_KERNEL_MAX_ROWS", 1 << 30)
    assert torch.equal(lin(x, b), want)
    monkeypatch.setattr(cpu_linear, "W8A8_KERNEL_MAX_ROWS", 0)  # oneDNN's int8 GEMM: the same exact sums
    assert torch.equal(lin(x, b), want)
    assert torch.equal(int8_linear.w8a8_linear(x, wq, w_scale, b), want)  # the plain-torch twin


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_per_token_quantization_kernel_is_the_reference(kernels, dtype):
    x = (torch.randn(9, 131, generator=torch.Generator().manual_seed(1)) * 5).to(dtype)
    x[2] = 0
    x[3, 7] = 2.5 * x[3].abs().max() / 127 * 1  # a value that rounds at a half step somewhere is fine either way
    q, scale = kernels.quantize_per_token(x, 136)
    want_q, want_scale = reference_quantize(x)
    assert torch.equal(scale, want_scale)
    assert torch.equal(q[:, :131].long(), want_q) and not q[:, 131:].any()


@needs_kernels
@pytest.mark.parametrize("rows,k,n", [s for s in SHAPES if s[1] % 2 == 0])
def test_w8a16_kernel_sums_bf16_times_int8_in_fp32(kernels, rows, k, n, monkeypatch):
    """The int8 weights are made bf16 exactly, so the kernel equals the fp64 sum to fp32 summation order."""
    x, wq, w_scale, b = make_case(rows, k, n, seed=2)
    want = (x.double() @ wq.double().t()) * w_scale.double() + b.double()
    lin = CpuInt8Linear(wq, w_scale, "w8a16", kernels, torch.bfloat16)
    assert lin.packed is not None
    got = kernels.linear_w8a16(x, lin.packed, lin.scale_padded, n, b, True)  # fp32 out: no final rounding
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4 * want.abs().max().item())
    monkeypatch.setattr(cpu_linear, "W8A16_KERNEL_MAX_ROWS", 1 << 30)
    bf16 = lin(x, b.bfloat16())
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.double(), want, rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())


def test_weight_quantization_is_symmetric_per_output_channel():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [127.0, 63.5, -127.0]])
    q, scale = quantize_weight(w)
    assert torch.equal(scale, torch.tensor([2 / 127, 1.0, 1.0]))
    assert torch.equal(q, torch.tensor([[64, -127, 32], [0, 0, 0], [127, 64, -127]], dtype=torch.int8))


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 0.0, float("inf")])
def test_a_corrupt_scale_is_one_clear_error(bad):
    from npu_infer.models.layers.linear import ColumnParallelLinear
    from npu_infer.distributed.parallel_state import init_model_parallel
    init_model_parallel(1, 1, 0)
    layer = ColumnParallelLinear(8, 4)
    scale = torch.ones(4)
    scale[2] = bad
    with pytest.raises(ValueError, match="scales must be finite and positive"):
        make_int8(layer, "w8a8", torch.zeros(4, 8, dtype=torch.int8), scale)
    with pytest.raises(ValueError, match="one scale per output row"):
        make_int8(layer, "w8a8", torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))


# ---------------------------------------------------------------------------------------------------------------
def generate(model_dir, quantization, prompts, **kwargs):
    from npu_infer import LLM, SamplingParams
    llm = LLM(str(model_dir), device="cpu", dtype="bfloat16", kv_cache_memory="8MiB", skip_tokenizer_init=True,
              max_model_len=256, quantization=quantization, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return llm, [(o.outputs[0].token_ids, [max(lp.logprob for lp in step.values()) for step in o.outputs[0].logprobs])
                 for o in outs]


PROMPTS = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 40)]


def prompt_logprobs(model_dir, quantization, prompt):
    from npu_infer import LLM, SamplingParams
    llm = LLM(str(model_dir), device="cpu", dtype="bfloat16", kv_cache_memory="8MiB", skip_tokenizer_init=True,
              max_model_len=256, max_num_batched_tokens=8, max_num_seqs=4, quantization=quantization)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    return llm, torch.tensor([out.prompt_logprobs[i][t].logprob for i, t in enumerate(prompt) if i > 0])


@pytest.mark.parametrize("scheme", ["w8a8", "w8a16"])
def test_engine_under_each_scheme_through_the_kernels_agrees_with_the_twin_path(scheme, tiny_llama_dir):
    """Teacher-forced (a random model's greedy tokens sit on near-ties): the prompt's logprobs, prefilled 8 tokens
    a step so the decode kernels run, through the kernels and through plain torch, against transformers' fp32
    forward: the kernels may not be less exact than the twin. int8 weights, bf16 embedding and LM head."""
    from conftest import set_cpu_kernels
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    results = {}
    for path in ("cpu-kernels", "plain-torch"):
        set_cpu_kernels(path == "cpu-kernels")
        try:
            llm, results[path] = prompt_logprobs(tiny_llama_dir, scheme, prompt)
        finally:
            set_cpu_kernels(True)
        model = llm.engine.executor.worker.model
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert qkv.weight.dtype == torch.int8 and qkv.quant_scheme == scheme
        assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
        kernel = getattr(qkv.platform_matmul, "packed", None)
        assert (kernel is not None) == (path == "cpu-kernels" and HAS_KERNELS and (scheme == "w8a16" or HAS_VNNI))
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(torch.tensor([prompt]))
    want = ref.logits[0].log_softmax(-1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    errors = {path: (got - want).abs().max().item() for path, got in results.items()}
    assert errors["plain-torch"] < 0.2, errors  # bf16 and int8 noise on a random model
    assert errors["cpu-kernels"] <= 1.5 * errors["plain-torch"] + 0.01, errors


class TwinInt8Linear(CpuInt8Linear):
    """CpuInt8Linear that always computes with the plain-torch twin (int8_linear.py), and stays out of the stack."""
    runs_in_stack = False

    def __call__(self, x, bias):
        return int8_linear.w8a8_linear(x, self.weight, self.scale, bias) if self.scheme == "w8a8" else \
            int8_linear.w8a16_linear(x, self.weight, self.scale, bias)


@pytest.mark.parametrize("scheme", ["w8a8", "w8a16"])
def test_smollm2_under_each_scheme_gives_the_twin_linears_tokens(scheme, smollm2_gguf, smollm2_tokenizer,
                                                                monkeypatch):
    """The real model (GGUF, dequantized then quantized on load), everything else on the same kernels: greedy
    tokens with the int8 kernels (the C++ decode stack included) equal those with the plain-torch int8 linears."""
    if not HAS_KERNELS or (scheme == "w8a8" and not HAS_VNNI):
        pytest.skip("no int8 kernels on this CPU")
    from npu_infer import LLM, SamplingParams
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    tokens = {}
    for path in ("kernels", "twin"):
        if path == "twin":
            monkeypatch.setattr(cpu_linear, "CpuInt8Linear", TwinInt8Linear)
        llm = LLM(str(smollm2_gguf), device="cpu", dtype="bfloat16", kv_cache_memory="32MiB", max_model_len=256,
                  quantization=scheme)
        stack = llm.engine.executor.worker.model.model.platform_decode
        assert (stack is not None) == (path == "kernels")
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        tokens[path] = [o.outputs[0].token_ids for o in outs]
    # w8a8: the same bits (exact int32 sums, the same scale math); w8a16: fp32 sums in another order, so a late
    # near-tie may break the other way (seen at token 20 of 24).
    horizon = 24 if scheme == "w8a8" else 16
    assert [t[:horizon] for t in tokens["kernels"]] == [t[:horizon] for t in tokens["twin"]]
    assert "Paris" in smollm2_tokenizer.decode(tokens["kernels"][0])


@pytest.mark.parametrize("scheme", ["w8a8", "w8a16"])
def test_decode_stack_gives_the_python_int8_layers_bits(scheme, tiny_llama_dir, monkeypatch):
    if not HAS_KERNELS or (scheme == "w8a8" and not HAS_VNNI):
        pytest.skip("no int8 kernels on this CPU")
    import npu_infer.platform as platform
    results = {}
    for stack in ("1", "0"):
        monkeypatch.setenv("NPU_INFER_CPU_DECODE_STACK", stack)
        platform._current = None
        llm, results[stack] = generate(tiny_llama_dir, scheme, PROMPTS)
        assert (llm.engine.executor.worker.model.model.platform_decode is not None) == (stack == "1")
    assert results["1"] == results["0"]


def test_int8_quantization_of_an_already_quantized_checkpoint_is_one_clear_error(tiny_llama_dir, tmp_path):
    import json
    import shutil
    from npu_infer import LLM
    model_dir = tmp_path / "bnb"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="already quantized \\(bitsandbytes\\)"):
        LLM(str(model_dir), device="cpu", skip_tokenizer_init=True, quantization="w8a8", kv_cache_memory="8MiB")


def test_an_unknown_quantization_is_one_clear_error(tiny_llama_dir):
    from npu_infer import LLM
    with pytest.raises(ValueError, match="unknown quantization 'w4a4'.*w8a8, w8a16"):
        LLM(str(tiny_llama_dir), device="cpu", skip_tokenizer_init=True, quantization="w4a4", kv_cache_memory="8MiB")
