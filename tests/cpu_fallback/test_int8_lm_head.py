"""NPU_INFER_INT8_LM_HEAD: --quantization w8a8|w8a16 on load makes the LM head int8 too. Its logits stay fp32 (the
kernel's against the plain-torch twin), the embedding keeps the model dtype whether it is tied to the head or not,
and the engine's teacher-forced logprobs stay as close to transformers' fp32 forward as with a bf16 head."""
from __future__ import annotations

import pytest
import torch

from conftest import cpu_has_kernel_flags, set_cpu_kernels
from cpu_fallback.test_int8 import prompt_logprobs
from npu_infer.models.layers import int8_linear
from npu_infer.models.layers.int8_linear import quantize_weight
from npu_infer.platform import cpu_kernels
from npu_infer.platform.cpu_linear import CpuInt8Linear

HAS_KERNELS = cpu_has_kernel_flags()
HAS_VNNI = HAS_KERNELS and "avx512_vnni" in cpu_kernels.cpu_flags()


@pytest.mark.parametrize("scheme", ["w8a8", "w8a16"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_int8_head_kernel_gives_the_twins_fp32_logits(scheme, rows):
    if not HAS_KERNELS or (scheme == "w8a8" and not HAS_VNNI):
        pytest.skip("no int8 kernels on this CPU")
    g = torch.Generator().manual_seed(rows)
    wq, scale = quantize_weight(torch.randn(1000, 576, generator=g))  # 1000: not whole 64-row panels
    x = (torch.randn(rows, 576, generator=g) * 3).bfloat16()
    head = CpuInt8Linear(wq, scale, scheme, cpu_kernels.load(), torch.bfloat16, fp32_out=True)
    assert head.packed is not None
    got = head(x, None)
    twin = int8_linear.w8a8_linear if scheme == "w8a8" else int8_linear.w8a16_linear
    want = twin(x, wq, scale, None, torch.float32)
    assert got.dtype == torch.float32 and want.dtype == torch.float32
    if scheme == "w8a8":  # exact int32 sums, the same fp32 scale math
        assert torch.equal(got, want)
    else:  # fp32 sums in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("scheme", ["w8a8", "w8a16"])
@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])  # untied, tied embedding
def test_engine_with_an_int8_head_on_both_op_paths(scheme, model_fixture, request, monkeypatch):
    from transformers import AutoModelForCausalLM
    model_dir = request.getfixturevalue(model_fixture)
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(torch.tensor([prompt]))
    want = ref.logits[0].log_softmax(-1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    errors = {}
    for head in ("bf16", "int8"):
        for path in ("cpu-kernels", "plain-torch"):
            if head == "int8":
                monkeypatch.setenv("NPU_INFER_INT8_LM_HEAD", "1")
            set_cpu_kernels(path == "cpu-kernels")
            try:
                llm, got = prompt_logprobs(model_dir, scheme, prompt)
            finally:
                set_cpu_kernels(True)
                monkeypatch.delenv("NPU_INFER_INT8_LM_HEAD", raising=False)
            model = llm.engine.executor.worker.model
            assert model.lm_head.weight.dtype == (torch.int8 if head == "int8" else torch.bfloat16)
            assert model.model.embed_tokens.weight.dtype == torch.bfloat16
            hidden = torch.randn(3, model.model.embed_tokens.weight.shape[1]).bfloat16()
            logits = model.compute_logits(hidden)
            assert logits.dtype == (torch.float32 if head == "int8" or path == "cpu-kernels" else torch.bfloat16)
            assert logits.shape == (3, 256)
            errors[head, path] = (got - want).abs().max().item()
    for path in ("cpu-kernels", "plain-torch"):  # int8 noise of a random model's head, on top of the rest
        assert errors["int8", path] < 0.3, errors
        assert errors["int8", path] <= 2 * errors["bf16", path] + 0.05, errors
