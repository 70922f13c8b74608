"""SmoothQuant for w8a8 quantize-on-load (npu_infer/models/layers/smooth_quant.py): the folds leave the
full-precision model's function unchanged, they make w8a8 closer to the unquantized model where activations have
outlier channels, and a bad NPU_INFER_W8A8_SMOOTHING is one clear error."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from npu_infer import LLM, SamplingParams
from npu_infer.models.layers.smooth_quant import activation_ranges, smooth_decoder_layers

PROMPT = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(7)).tolist()


def prompt_logprobs(llm: LLM) -> torch.Tensor:
    out = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return torch.tensor([out.prompt_logprobs[i][t].logprob for i, t in enumerate(PROMPT) if i > 0])


def engine(model_dir, **kwargs) -> LLM:
    return LLM(str(model_dir), device="cpu", kv_cache_memory="8MiB", skip_tokenizer_init=True, max_model_len=256,
               enable_prefix_caching=False, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_folds_keep_the_full_precision_model_function(arch, tiny_llama_dir, tiny_qwen2_dir, monkeypatch):
    """fp32, plain torch (the layers read their parameters on every call): smoothing in place changes the
    weights a lot and the logprobs by fp32 rounding only."""
    from conftest import set_cpu_kernels
    monkeypatch.setenv("NPU_INFER_CPU_PACK_WEIGHTS", "0")
    set_cpu_kernels(False)
    try:
        llm = engine(tiny_llama_dir if arch == "llama" else tiny_qwen2_dir, dtype="float32")
        model = llm.engine.executor.worker.model
        want = prompt_logprobs(llm)
        ranges = activation_ranges(model, lambda: prompt_logprobs(llm))
        norm_before = model.model.layers[0].input_layernorm.weight.clone()
        up_before = model.model.layers[0].mlp.gate_up_proj.weight.clone()
        factors = smooth_decoder_layers(model, ranges, alpha=0.75)
        assert len(factors) == len(model.model.layers) == 2
        for s_qkv, s_gate_up, s_down in factors.values():
            assert all((s - 1).abs().max() > 0.5 for s in (s_qkv, s_gate_up, s_down))  # really rescaled
        assert not torch.allclose(model.model.layers[0].input_layernorm.weight, norm_before, rtol=0.1)
        assert not torch.allclose(model.model.layers[0].mlp.gate_up_proj.weight, up_before, rtol=0.1)
        torch.testing.assert_close(prompt_logprobs(llm), want, rtol=1e-4, atol=1e-4)
    finally:
        set_cpu_kernels(True)


@pytest.fixture(scope="module")
def outlier_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a few hidden channels 40x louder after each norm: the outliers that per-token int8
    activations handle badly, as trained LLMs have them."""
    out = tmp_path_factory.mktemp("outliers")
    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    for name, t in tensors.items():
        if name.endswith("layernorm.weight"):
            t[[3, 17, 40]] *= 40
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_smoothing_brings_w8a8_closer_to_the_unquantized_model(outlier_llama_dir, monkeypatch):
    want = prompt_logprobs(engine(outlier_llama_dir, dtype="bfloat16"))
    smoothed = prompt_logprobs(engine(outlier_llama_dir, dtype="bfloat16", quantization="w8a8"))
    monkeypatch.setenv("NPU_INFER_W8A8_SMOOTHING", "0")
    plain = prompt_logprobs(engine(outlier_llama_dir, dtype="bfloat16", quantization="w8a8"))
    error_smoothed, error_plain = (smoothed - want).abs().mean(), (plain - want).abs().mean()
    assert error_smoothed < 0.6 * error_plain, (error_smoothed, error_plain)


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "half"])
def test_a_bad_alpha_is_one_clear_error(bad, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("NPU_INFER_W8A8_SMOOTHING", bad)
    with pytest.raises(ValueError, match=r"NPU_INFER_W8A8_SMOOTHING=.* must be a number from 0 \(no smoothing\) to 1"):
        engine(tiny_llama_dir, dtype="bfloat16", quantization="w8a8")
