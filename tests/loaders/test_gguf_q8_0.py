"""GGUF Q8_0 decoder linears served as stored (gguf_as_stored.py): int8 weights with their 32-weight block scales in
W8A16 layers, never dequantized; the same greedy tokens as the dequantized weights served in bf16; the rules for
--quantization and mixed files; a corrupt block scale named by layer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loaders.conftest import gguf, write_llama_gguf

T = gguf.GGMLQuantizationType
PROMPTS = [[1, 5, 9, 30, 7], list(range(40, 73)), [3, 300, 17, 250, 99, 4, 8]]


def q8_0_power_of_two(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 blocks of [N, K] with each d a power of two, and their dequantized values: q * d is then exact in
    bf16 as well (q has 7 bits), so the dequantized bf16 model holds the same weights as the int8 one."""
    n, k = arr.shape
    blocks = arr.reshape(n, k // 32, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    d = np.exp2(np.ceil(np.log2(np.maximum(amax, 1e-20) / 127))).astype(np.float16)
    q = np.clip(np.round(blocks / d.astype(np.float32)), -127, 127).astype(np.int8)
    raw = np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=-1).reshape(n, k // 32 * 34)
    return raw, (q.astype(np.float32) * d.astype(np.float32)).reshape(n, k)


def write_gguf(path: Path, *, linears: str, f16_parts: tuple[str, ...] = (), corrupt: str | None = None) -> Path:
    """A tiny random Llama as llama.cpp writes it. linears "q8_0": decoder linears Q8_0 (power-of-two d); "f32":
    those same weights dequantized. The embedding and output are Q8_0 (gguf's own quantizer) either way.
    `f16_parts`: HF name pieces written F16 instead; `corrupt`: a piece whose first block's d is -1."""
    def linear(name: str, arr: np.ndarray):
        raw, dequantized = q8_0_power_of_two(arr)
        if corrupt and corrupt in name:
            raw[0, :2] = np.array([-1.0], dtype=np.float16).view(np.uint8)
        if any(part in name for part in f16_parts):
            return dequantized.astype(np.float16), None
        return (raw, T.Q8_0) if linears == "q8_0" else (dequantized, None)

    return write_llama_gguf(path, 3, linear)


@pytest.fixture(scope="module")
def q8_0_files(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("q8_0")
    return {kind: write_gguf(out / f"tiny-{kind}.gguf", linears=kind) for kind in ("q8_0", "f32")}


def engine(path, dtype="bfloat16", **kwargs):
    from npu_infer import LLM
    return LLM(str(path), device="cpu", dtype=dtype, kv_cache_memory="8MiB", skip_tokenizer_init=True,
               max_model_len=256, **kwargs)


def greedy(llm) -> list[list[int]]:
    from npu_infer import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]


def int8_layers(llm) -> dict[str, torch.nn.Module]:
    model = llm.engine.executor.worker.model
    return {name: m for name, m in model.named_modules() if getattr(m, "quant_scheme", None) is not None}


def test_q8_0_linears_are_served_as_stored_with_their_block_scales(q8_0_files, monkeypatch):
    from npu_infer.loaders import gguf_loader
    from npu_infer.loaders.gguf_loader import iterate_gguf_weights
    from npu_infer.models.layers.int8_linear import dequantize_weight
    dequantized_types = []
    real = gguf_loader.dequantize
    monkeypatch.setattr(gguf_loader, "dequantize", lambda data, qtype, shape: (dequantized_types.append(qtype.name),
                                                                                real(data, qtype, shape))[1])
    llm = engine(q8_0_files["q8_0"])
    assert dequantized_types.count("Q8_0") == 2  # the embedding and the LM head, nothing else
    layers = int8_layers(llm)
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down per layer
    expected = dict(iterate_gguf_weights(q8_0_files["q8_0"], show_progress=False))  # dequantized, fp32
    for name, layer in layers.items():
        n, k = layer.weight.shape
        assert layer.quant_scheme == "w8a16" and layer.weight.dtype == torch.int8
        assert layer.weight_scale.shape == (n, k // 32) and layer.weight_scale.dtype == torch.float32
        prefix, leaf = name.rsplit(".", 1)
        parts = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}.get(leaf, [leaf])
        want = torch.cat([expected[f"{prefix}.{p}.weight"] for p in parts])
        assert torch.equal(dequantize_weight(layer.weight, layer.weight_scale), want), name  # exact: q * d
    model = llm.engine.executor.worker.model
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("path", ["cpu-kernels", "plain-torch"])
def test_q8_0_greedy_tokens_equal_the_dequantized_weights_in_bf16(q8_0_files, path):
    from conftest import cpu_has_kernel_flags, set_cpu_kernels
    if path == "cpu-kernels" and not cpu_has_kernel_flags():
        pytest.skip("this CPU lacks AVX-512 BF16")
    set_cpu_kernels(path == "cpu-kernels")
    try:
        stored = engine(q8_0_files["q8_0"])
        assert len(int8_layers(stored)) == 8
        if path == "cpu-kernels":  # the C++ decode stack runs the group-wise layers
            assert stored.engine.executor.worker.model.model.platform_decode is not None
        tokens = greedy(stored)
        dequantized = engine(q8_0_files["f32"])
        assert not int8_layers(dequantized)
        assert tokens == greedy(dequantized)
    finally:
        set_cpu_kernels(True)


def test_w8a16_on_a_q8_0_file_serves_it_as_stored(q8_0_files, monkeypatch):
    monkeypatch.setenv("NPU_INFER_W8A16_GROUP_SIZE", "64")  # not what Q8_0's layers get: they keep their 32
    llm = engine(q8_0_files["q8_0"], quantization="w8a16")
    assert {tuple(m.weight_scale.shape) for m in int8_layers(llm).values()} == {(128, 2), (64, 2), (256, 2), (64, 4)}
    assert greedy(llm) == greedy(engine(q8_0_files["q8_0"]))


def test_w8a8_on_a_q8_0_file_is_one_clear_error(q8_0_files):
    with pytest.raises(ValueError, match="linears are already int8 \\(GGUF Q8_0, served as stored as W8A16"):
        engine(q8_0_files["q8_0"], quantization="w8a8")


def test_in_fp32_q8_0_is_dequantized_exactly(q8_0_files):
    llm = engine(q8_0_files["q8_0"], dtype="float32")
    assert not int8_layers(llm)
    assert greedy(llm) == greedy(engine(q8_0_files["f32"], dtype="float32"))


def test_a_merged_layer_with_one_part_not_q8_0_is_dequantized(tmp_path):
    path = write_gguf(tmp_path / "mixed.gguf", linears="q8_0", f16_parts=("layers.1.self_attn.k_proj",))
    layers = int8_layers(engine(path))
    assert "model.layers.1.self_attn.qkv_proj" not in layers and "model.layers.0.self_attn.qkv_proj" in layers
    assert len(layers) == 7


def test_a_corrupt_q8_0_block_scale_is_named_by_layer(tmp_path):
    path = write_gguf(tmp_path / "corrupt.gguf", linears="q8_0", corrupt="layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj.weight_scale: int8 weight scales must be "
                                         "finite and positive"):
        engine(path)
