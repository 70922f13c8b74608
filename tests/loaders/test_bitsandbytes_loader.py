"""bitsandbytes on the CPU backend: linear layers quantized on load (nf4, fp4, int8) and pre-quantized checkpoints
made by transformers' BitsAndBytesConfig.

Closeness bounds, on the log-probabilities of every prompt position's top 5 and of 16 greedy tokens:
* 4-bit (nf4, fp4): within 1e-4 of the same model whose linear weights are bitsandbytes' own dequantization of the
  4-bit weights (measured ~3e-6): the engine computes exactly the quantized model. Greedy tokens identical.
* int8 (LLM.int8, threshold 6.0): within 1e-4 of transformers' bitsandbytes 8-bit model (measured 0), one sequence
  at a time — LLM.int8 picks outlier columns over the whole batch, so batched numbers legitimately differ a little.
* the quantization error itself: relative Frobenius error of each dequantized weight < 0.11 (nf4; measured 0.092),
  0.14 (fp4; 0.122), 0.01 (int8).
"""
from __future__ import annotations

import math
import shutil

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from npu_infer import LLM, SamplingParams  # noqa: E402
from npu_infer.models.layers.quantized_linear import BnbLinear  # noqa: E402

PROMPTS = [[1, 5, 9, 30, 7, 100, 3], list(range(40, 73))]
NEW_TOKENS = 16
TOL = 1e-4


def make_llm(path, **kwargs) -> LLM:
    args = dict(device="cpu", dtype="float32", kv_cache_memory="4MiB", skip_tokenizer_init=True, max_model_len=128,
                max_num_seqs=4, max_num_batched_tokens=128)
    args.update(kwargs)
    return LLM(str(path), **args)


def engine_outputs(llm: LLM):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [(o.outputs[0].token_ids, o.prompt_logprobs) for o in outs]


@torch.no_grad()
def reference_outputs(model):
    """transformers: greedy tokens and log-softmax of every prompt position, one prompt at a time."""
    out = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        out.append((tokens, logprobs))
    return out


def assert_close(engine, reference, tol=TOL, same_tokens=True):
    worst = 0.0
    for (tokens, prompt_lps), (ref_tokens, ref_lps) in zip(engine, reference):
        for pos in range(1, len(prompt_lps)):
            for token, lp in prompt_lps[pos].items():
                worst = max(worst, abs(lp.logprob - ref_lps[pos - 1, token].item()))
        if same_tokens:
            assert tokens == ref_tokens
    assert worst < tol, f"max |logprob difference| {worst:.3g} >= {tol}"
    return worst


def linears(llm: LLM) -> list[BnbLinear]:
    return [m for m in llm.engine.executor.worker.model.modules() if isinstance(m, BnbLinear)]


def dequantized_hf_model(path, dequantize):
    """The full-precision transformers model with each decoder linear weight replaced by dequantize(name, weight)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(dequantize(name, module.weight))
    return model.eval()


@pytest.fixture(params=["llama", "qwen2"])
def checkpoint(request, tiny_llama_dir, tiny_qwen2_dir):
    return tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_on_the_fly_4bit_computes_the_dequantized_model(checkpoint, mode, monkeypatch):
    monkeypatch.setenv("NPU_INFER_BNB_QUANT", mode)
    llm = make_llm(checkpoint, quantization="bitsandbytes")
    layers = linears(llm)
    assert len(layers) == 4 * 2 and all(m.mode == mode and m.weight.dtype == torch.uint8 for m in layers)
    # 4 bits a weight: half the elements' count in bytes.
    assert all(m.weight.numel() == m.in_features * m.out_features // 2 for m in layers)

    def quant_dequant(name, w):
        packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=64, quant_type=mode)
        return bnbf.dequantize_4bit(packed, state)

    reference = dequantized_hf_model(checkpoint, quant_dequant)
    assert_close(engine_outputs(llm), reference_outputs(reference))
    full = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for name, module in full.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w = module.weight.detach()
            assert (quant_dequant(name, w) - w).norm() / w.norm() < {"nf4": 0.11, "fp4": 0.14}[mode]


def test_on_the_fly_int8_equals_transformers_llm_int8(checkpoint, monkeypatch):
    monkeypatch.setenv("NPU_INFER_BNB_QUANT", "int8")
    llm = make_llm(checkpoint, load_format="bitsandbytes", max_num_seqs=1)
    layers = linears(llm)
    assert layers and all(m.mode == "int8" and m.weight.dtype == torch.int8 for m in layers)
    hf_int8 = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map="cpu",
                                                   quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    assert_close(engine_outputs(llm), reference_outputs(hf_int8))
    for layer in layers:
        w = layer.dequantized_weight()
        assert w.dtype == torch.float32 and torch.isfinite(w).all()


def test_int8_weights_are_within_one_percent(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("NPU_INFER_BNB_QUANT", "int8")
    llm = make_llm(tiny_llama_dir, quantization="bitsandbytes")
    qkv = llm.engine.executor.worker.model.model.layers[0].self_attn.qkv_proj
    state = load_file(str(tiny_llama_dir / "model.safetensors"))
    w = torch.cat([state[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert (qkv.dequantized_weight() - w).norm() / w.norm() < 0.01


PREQUANTIZED = {
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-double-quant": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
}


def prequantized_checkpoint(src, out, kind):
    """What a user downloads as a '-bnb-4bit' / '-8bit' model: transformers quantizes and saves it."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, device_map="cpu",
                                                 quantization_config=PREQUANTIZED[kind])
    model.save_pretrained(out)
    return out


def checkpoint_4bit_weight(path):
    """bitsandbytes' own dequantization of each 4-bit weight in the saved file (the ground truth)."""
    tensors = load_file(str(path / "model.safetensors"))

    def dequantize(name, w):
        key = f"{name}.weight"
        parts = {k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + ".")}
        state = bnbf.QuantState.from_dict(parts, device=torch.device("cpu"))
        return bnbf.dequantize_4bit(tensors[key], state).float()
    return dequantize


@pytest.mark.parametrize("kind", list(PREQUANTIZED))
def test_prequantized_checkpoint(checkpoint, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("NPU_INFER_BNB_QUANT", "fp4")  # a pre-quantized checkpoint's own settings must win
    path = prequantized_checkpoint(checkpoint, tmp_path / kind, kind)
    llm = make_llm(path, max_num_seqs=1)  # auto: config.json's quantization_config says bitsandbytes
    layers = linears(llm)
    expected_mode = "int8" if kind == "8bit" else kind.split("-")[0]
    assert layers and all(m.mode == expected_mode for m in layers)
    ours = engine_outputs(llm)
    if kind == "8bit":
        reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu")
        assert_close(ours, reference_outputs(reloaded))
    else:
        assert_close(ours, reference_outputs(dequantized_hf_model(checkpoint, checkpoint_4bit_weight(path))))


def test_tensor_parallel_nf4_matches_one_rank(tmp_path, monkeypatch):
    """Each rank quantizes its own shard; with every shard's rows a multiple of the 64-weight block (hidden 128 over
    two ranks) the blocks are those of the whole weight, so two ranks compute what one does."""
    pytest.importorskip("npu_infer.worker.multiproc_executor")
    from conftest import make_tiny_model
    path = make_tiny_model(tmp_path / "qwen2-128", "qwen2", hidden=128)
    monkeypatch.setenv("NPU_INFER_BNB_QUANT", "nf4")
    one = engine_outputs(make_llm(path, quantization="bitsandbytes"))
    two = engine_outputs(make_llm(path, quantization="bitsandbytes", tensor_parallel_size=2))
    assert [t for t, _ in two] == [t for t, _ in one]


def test_bfloat16_nf4_gives_finite_logprobs(tiny_llama_dir, monkeypatch):
    monkeypatch.delenv("NPU_INFER_BNB_QUANT", raising=False)
    llm = make_llm(tiny_llama_dir, quantization="bitsandbytes", dtype="bfloat16")
    for tokens, prompt_lps in engine_outputs(llm):
        assert len(tokens) == NEW_TOKENS
        assert all(math.isfinite(lp.logprob) for d in prompt_lps[1:] for lp in d.values())


def test_other_sources_quantize_like_safetensors(tiny_llama_dir, tmp_path, monkeypatch):
    """--quantization bitsandbytes on a tensorized copy computes exactly what it does on the safetensors original."""
    from npu_infer.loaders.tensorize import tensorize_model
    monkeypatch.setenv("NPU_INFER_BNB_QUANT", "nf4")
    tensorize_model(str(tiny_llama_dir), str(tmp_path / "tz"))
    from_tensors = make_llm(tmp_path / "tz", load_format="tensorizer", quantization="bitsandbytes")
    assert len(linears(from_tensors)) == 8
    assert engine_outputs(from_tensors) == engine_outputs(make_llm(tiny_llama_dir, quantization="bitsandbytes"))


def test_dummy_weights_are_quantized_too(tiny_llama_dir, monkeypatch):
    """--load-format dummy --quantization bitsandbytes: the seeded dummy weights, held in nf4."""
    monkeypatch.setenv("NPU_INFER_BNB_QUANT", "nf4")
    plain = make_llm(tiny_llama_dir, load_format="dummy").engine.executor.worker.model
    quantized = make_llm(tiny_llama_dir, load_format="dummy", quantization="bitsandbytes")
    layer = quantized.engine.executor.worker.model.model.layers[1].mlp.down_proj
    assert isinstance(layer, BnbLinear)
    w = plain.model.layers[1].mlp.down_proj.weight
    assert (layer.dequantized_weight() - w).norm() / w.norm() < 0.11
    tokens, prompt_lps = engine_outputs(quantized)[0]
    assert len(tokens) == NEW_TOKENS and all(math.isfinite(lp.logprob) for d in prompt_lps[1:] for lp in d.values())


# ---- what fails, and how ---------------------------------------------------------------------------------------

def test_unknown_mode_is_one_sentence(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("NPU_INFER_BNB_QUANT", "int4")
    with pytest.raises(ValueError, match="NPU_INFER_BNB_QUANT='int4' is not a bitsandbytes mode; use nf4, fp4 or int8"):
        make_llm(tiny_llama_dir, quantization="bitsandbytes")


def test_a_device_bitsandbytes_cannot_run_is_one_sentence(tiny_llama_dir, monkeypatch):
    """What an old bitsandbytes (GPU-only) does on the CPU: its kernels raise; we say what to do instead."""
    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")
    monkeypatch.setattr(bnbf, "quantize_4bit", no_kernel)
    with pytest.raises(ValueError, match=r"bitsandbytes .* cannot run nf4 on cpu \(no kernel for this device\); "
                                         r"use a device it supports") as exc:
        make_llm(tiny_llama_dir, quantization="bitsandbytes")
    assert "\n" not in str(exc.value)


# A missing bitsandbytes package: tests/test_optional_deps.py.


def test_bitsandbytes_refuses_a_sharded_state_directory(tiny_llama_dir, tmp_path):
    from npu_infer.loaders.save_sharded_state import save_sharded_state
    save_sharded_state(str(tiny_llama_dir), str(tmp_path / "s"))
    with pytest.raises(ValueError, match="give the original checkpoint"):
        make_llm(tmp_path / "s", quantization="bitsandbytes")


def test_prequantized_checkpoint_cannot_be_saved_as_sharded_state(tiny_llama_dir, tmp_path):
    from npu_infer.loaders.save_sharded_state import save_sharded_state
    path = prequantized_checkpoint(tiny_llama_dir, tmp_path / "q", "nf4")
    with pytest.raises(ValueError, match="is a bitsandbytes checkpoint; save-sharded-state needs a full-precision"):
        save_sharded_state(str(path), str(tmp_path / "out"))
    shutil.rmtree(path)
