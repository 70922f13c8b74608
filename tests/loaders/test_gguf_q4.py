"""GGUF Q4_0 / Q4_1 decoder linears served as stored with `--quantization gguf` (gguf_as_stored.py): W4A16 layers
(int4_linear.py) holding each block's q, d and m, never dequantized; the CPU kernel (cpu_int4_kernels.cpp) against
its plain-torch twin; the packaged SmolLM2 file's greedy tokens the same through both; a corrupt block scale named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loaders.conftest import gguf, write_llama_gguf

T = gguf.GGMLQuantizationType
PROMPTS = [[1, 5, 9, 30, 7], list(range(40, 73)), [3, 300, 17, 250, 99, 4, 8]]


@pytest.mark.parametrize("kind", [T.Q4_0, T.Q4_1])
def test_split_q4_gives_the_dequantized_weights_exactly(kind):
    from npu_infer.loaders.gguf_dequant import dequantize, split_q4
    from npu_infer.models.layers.int4_linear import dequantize_int4
    arr = np.random.default_rng(0).standard_normal((96, 128)).astype(np.float32)
    raw = gguf.quants.quantize(arr, kind)
    q, d, m = split_q4(raw, kind, (96, 128))
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and d.shape == m.shape == (96, 4)
    assert torch.equal(dequantize_int4(q, d, m), dequantize(raw, kind, (96, 128)))
    assert torch.equal(dequantize_int4(q, d, m), torch.from_numpy(gguf.quants.dequantize(raw, kind)))
    with pytest.raises(ValueError, match="needs K a multiple of 32"):
        split_q4(raw, kind, (96, 100))


@pytest.mark.parametrize("n,k", [(100, 64), (960, 576), (64, 1536)])
def test_w4a16_kernel_equals_its_plain_torch_twin(n, k):
    from conftest import cpu_has_kernel_flags
    if not cpu_has_kernel_flags():
        pytest.skip("this CPU lacks AVX-512 BF16")
    from npu_infer.models.layers.int4_linear import pack_int4, panel_layout, w4a16_linear
    from npu_infer.platform import cpu_kernels
    kernels = cpu_kernels.load()
    gen = torch.Generator().manual_seed(n + k)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    d = torch.rand(n, k // 32, generator=gen) * 0.02
    m = -torch.rand(n, k // 32, generator=gen) * 0.15  # Q4_1-like; Q4_0's is -8 d
    bias = torch.randn(n, generator=gen)
    packed = pack_int4(q)
    for rows in (1, 3, 4, 5, 64, 67):  # one pass per row count up to 4; more: the panel made bf16 once
        x = torch.randn(rows, k, generator=gen).bfloat16()
        for fp32_out, b in ((True, bias), (False, None)):
            got = kernels.linear_w4a16(x, packed, panel_layout(d), panel_layout(m), n, b, fp32_out)
            want = w4a16_linear(x, q, d, m, b, torch.float32 if fp32_out else None)
            assert got.dtype == want.dtype and got.shape == (rows, n)
            # The same fp32 sums in another order (per group, then d and m once a group).
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-5 if fp32_out else 1e-2,
                                       atol=1e-4 * float(want.float().abs().max()))
    with pytest.raises(RuntimeError, match="linear_w4a16: mins .* must match scales"):
        kernels.linear_w4a16(x, packed, panel_layout(d), panel_layout(m[:, :1]), n, None, False)
    with pytest.raises(RuntimeError, match="linear_w4a16: x must be contiguous bfloat16"):
        kernels.linear_w4a16(x.float(), packed, panel_layout(d), panel_layout(m), n, None, False)


def write_q4_gguf(path: Path, kind, corrupt: str | None = None) -> Path:
    """A tiny random Llama as llama.cpp writes it, its decoder linears in `kind` (Q4_0 / Q4_1), the embedding and
    the LM head Q8_0; `corrupt`: a piece whose first block's d is NaN."""
    def linear(name: str, arr: np.ndarray):
        raw = gguf.quants.quantize(arr, kind)
        if corrupt and corrupt in name:
            raw[0, :2] = np.array([np.nan], dtype=np.float16).view(np.uint8)
        return raw, kind

    return write_llama_gguf(path, 5, linear)


def engine(path, **kwargs):
    from npu_infer import LLM
    return LLM(str(path), device="cpu", dtype="bfloat16", kv_cache_memory="8MiB", max_model_len=256, **kwargs)


def greedy(llm, prompts=PROMPTS, max_tokens=16) -> list[list[int]]:
    from npu_infer import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def w4a16_layers(llm) -> dict[str, torch.nn.Module]:
    model = llm.engine.executor.worker.model
    return {name: m for name, m in model.named_modules() if getattr(m, "quant_scheme", None) == "w4a16"}


@pytest.mark.parametrize("kind", [T.Q4_0, T.Q4_1])
def test_q4_linears_are_served_as_stored_with_quantization_gguf(tmp_path, kind):
    from npu_infer.loaders.gguf_loader import iterate_gguf_weights
    from npu_infer.models.layers.int4_linear import dequantize_int4
    path = write_q4_gguf(tmp_path / "tiny.gguf", kind)
    from npu_infer.models.layers.int8_linear import dequantize_weight
    default = engine(path, skip_tokenizer_init=True)
    assert not w4a16_layers(default)  # by default: dequantized, as before
    assert getattr(default.engine.executor.worker.model.lm_head, "quant_scheme", None) is None
    llm = engine(path, skip_tokenizer_init=True, quantization="gguf")
    layers = w4a16_layers(llm)
    assert len(layers) == 2 * 4
    expected = dict(iterate_gguf_weights(path, show_progress=False))  # dequantized, fp32
    head = llm.engine.executor.worker.model.lm_head  # the file's Q8_0 output.weight, as stored
    vocab = expected["lm_head.weight"].shape[0]
    assert head.quant_scheme == "w8a16" and head.weight.dtype == torch.int8 and head.fp32_logits
    assert torch.equal(dequantize_weight(head.weight[:vocab], head.weight_scale[:vocab]), expected["lm_head.weight"])
    for name, layer in layers.items():
        prefix, leaf = name.rsplit(".", 1)
        parts = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}.get(leaf, [leaf])
        want = torch.cat([expected[f"{prefix}.{p}.weight"] for p in parts])
        assert torch.equal(dequantize_int4(layer.weight, layer.weight_scale, layer.weight_min), want), name


def test_a_corrupt_q4_block_scale_is_named(tmp_path):
    path = write_q4_gguf(tmp_path / "corrupt.gguf", T.Q4_1, corrupt="layers.1.mlp.down_proj")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight_scale: .*must be finite"):
        engine(path, skip_tokenizer_init=True, quantization="gguf")


def test_packaged_smollm2_q4_1_same_tokens_through_the_kernel_and_the_twin(smollm2_gguf):
    from conftest import cpu_has_kernel_flags, set_cpu_kernels
    if not cpu_has_kernel_flags():
        pytest.skip("this CPU lacks AVX-512 BF16")
    from npu_infer.platform.cpu_linear import CpuInt4Linear
    prompts = [[1, 504, 3458, 282, 4649, 314], list(range(200, 240)), [9690, 198, 2683, 359]]
    stored = engine(smollm2_gguf, quantization="gguf")
    model = stored.engine.executor.worker.model
    assert len(w4a16_layers(stored)) == 30 * 4
    assert isinstance(model.model.layers[0].mlp.down_proj.platform_matmul, CpuInt4Linear)
    assert model.model.platform_decode is not None  # the C++ decode stack runs the W4A16 layers
    assert model.lm_head.quant_scheme == "w8a16" and model.lm_head.weight.dtype == torch.int8  # the tied Q8_0 one
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # the lookup keeps its dequantized rows
    tokens = greedy(stored, prompts)
    set_cpu_kernels(False)
    try:
        twin = engine(smollm2_gguf, quantization="gguf")
        assert len(w4a16_layers(twin)) == 30 * 4
        assert twin.engine.executor.worker.model.model.platform_decode is None
        assert greedy(twin, prompts) == tokens
    finally:
        set_cpu_kernels(True)
