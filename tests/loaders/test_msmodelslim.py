"""msmodelslim int8 checkpoints (quant_model_description.json): written here from a tiny random model with
msmodelslim's conventions, loaded back; W8A8_DYNAMIC / W8A16 against the same weights quantized on load, static
W8A8 against its integer formula; one clear error for each bad checkpoint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loaders.msmodelslim_writer import write_msmodelslim
from npu_infer import LLM, SamplingParams

PROMPTS = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 40)]


def run(model_dir, **kwargs):
    llm = LLM(str(model_dir), device="cpu", dtype="bfloat16", kv_cache_memory="8MiB", skip_tokenizer_init=True,
              max_model_len=256, **kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2))
    return llm.engine.executor.worker.model, outs


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def dynamic_dir(tiny_qwen2_dir, tmp_path_factory):
    return write_msmodelslim(tiny_qwen2_dir, tmp_path_factory.mktemp("msmodelslim-dyn"))


@pytest.fixture(scope="module")
def static_dir(tiny_qwen2_dir, tmp_path_factory):
    return write_msmodelslim(tiny_qwen2_dir, tmp_path_factory.mktemp("msmodelslim-static"), "W8A8")


# =========================================================================== served as stored

@pytest.mark.parametrize("kind, scheme", [("W8A8_DYNAMIC", "w8a8"), ("W8A16", "w8a16")])
def test_checkpoint_gives_the_tokens_and_weights_of_quantize_on_load(kind, scheme, tiny_qwen2_dir, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("NPU_INFER_W8A8_SMOOTHING", "0")  # the writer quantizes the weights as they are, unsmoothed
    monkeypatch.setenv("NPU_INFER_W8A16_GROUP_SIZE", "channel")  # and per output channel, as msmodelslim does
    ckpt = write_msmodelslim(tiny_qwen2_dir, tmp_path / "ckpt", kind)
    loaded, outs = run(ckpt)
    on_load, want = run(tiny_qwen2_dir, quantization=scheme)
    assert tokens(outs) == tokens(want)
    for a, b in zip(loaded.model.layers, on_load.model.layers):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            la, lb = a.get_submodule(name), b.get_submodule(name)
            assert la.quant_scheme == lb.quant_scheme == scheme
            assert torch.equal(la.weight, lb.weight) and torch.equal(la.weight_scale, lb.weight_scale)


def test_vllm_ascends_quantization_name_is_accepted(dynamic_dir, tiny_qwen2_dir):
    _, outs = run(dynamic_dir, quantization="ascend")
    _, want = run(dynamic_dir)
    assert tokens(outs) == tokens(want)
    with pytest.raises(ValueError, match="--quantization ascend serves msmodelslim checkpoints, but .* has no "
                                         "quant_model_description.json"):
        run(tiny_qwen2_dir, quantization="ascend")


def test_static_w8a8_layer_is_the_integer_formula(static_dir):
    """y = (clamp(round(x / input_scale + input_offset), -128, 127) . q + quant_bias) * deq_scale, from the file's
    tensors, exactly; the layer's float bias is in quant_bias (vllm-ascend adds no other)."""
    model, _ = run(static_dir)
    stored = load_file(static_dir / "model.safetensors")
    layer = model.model.layers[1].self_attn.qkv_proj
    base = "model.layers.1.self_attn."
    assert layer.quant_scheme == "w8a8_static"
    x = (torch.randn(7, 64, generator=torch.Generator().manual_seed(0)) * 2).to(torch.bfloat16)
    s, o = float(stored[f"{base}q_proj.input_scale"]), float(stored[f"{base}q_proj.input_offset"])
    xq = [[max(-128, min(127, round(float(v) / s + o))) for v in row] for row in x.float().tolist()]
    want = []
    for proj in ("q_proj", "k_proj", "v_proj"):
        q = stored[f"{base}{proj}.weight"].tolist()
        qb, deq = stored[f"{base}{proj}.quant_bias"].tolist(), stored[f"{base}{proj}.deq_scale"]
        acc = torch.tensor([[sum(a * b for a, b in zip(row, w)) + qb[n] for n, w in enumerate(q)] for row in xq])
        want.append(acc.float() * deq)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.cat(want, dim=1).to(torch.bfloat16))


def test_static_w8a8_serves_close_to_the_unquantized_model(static_dir, tiny_qwen2_dir, tmp_path):
    _, outs = run(static_dir)
    _, full = run(tiny_qwen2_dir)
    agreed = sum(a == b for o, f in zip(tokens(outs), tokens(full)) for a, b in zip(o, f))
    assert agreed >= 0.5 * sum(map(len, tokens(full))), (tokens(outs), tokens(full))
    # fp16 models' checkpoints hold deq_scale as int64 (the fp32 scale's bits): the same model
    _, same = run(write_msmodelslim(tiny_qwen2_dir, tmp_path / "int64", "W8A8", deq_int64=True))
    assert tokens(same) == tokens(outs)


def test_float_layers_stay_unquantized(dynamic_dir, tmp_path):
    ckpt = tmp_path / "mixed"
    shutil.copytree(dynamic_dir, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    desc = json.loads((ckpt / "quant_model_description.json").read_text())
    base = "model.layers.0.mlp.down_proj"
    w = tensors.pop(f"{base}.weight").float() * tensors.pop(f"{base}.weight_scale")
    del tensors[f"{base}.weight_offset"], desc[f"{base}.weight_scale"], desc[f"{base}.weight_offset"]
    tensors[f"{base}.weight"], desc[f"{base}.weight"] = w.to(torch.bfloat16), "FLOAT"
    save_file(tensors, ckpt / "model.safetensors")
    (ckpt / "quant_model_description.json").write_text(json.dumps(desc))
    model, outs = run(ckpt)
    assert getattr(model.model.layers[0].mlp.down_proj, "quant_scheme", None) is None
    assert model.model.layers[0].mlp.gate_up_proj.quant_scheme == "w8a8"
    assert all(len(t) == 12 for t in tokens(outs))


# =========================================================================== bad checkpoints

def edited(src: Path, dst: Path, tensors=None, desc=None) -> Path:
    """A copy of checkpoint `src` with its tensors and / or description changed by the given functions."""
    shutil.copytree(src, dst)
    if tensors:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file(t, dst / "model.safetensors")
    if desc:
        d = json.loads((dst / "quant_model_description.json").read_text())
        desc(d)
        (dst / "quant_model_description.json").write_text(json.dumps(d))
    return dst


Q = "model.layers.0.self_attn.q_proj"


def _set(key, value):
    def edit(d):
        d[key] = value
    return edit


def _drop(key):
    def edit(d):
        del d[key]
    return edit


@pytest.mark.parametrize("tensors, desc, match", [
    (_drop(f"{Q}.weight_scale"), None, rf"^{Q}.weight_scale is missing from the checkpoint: a W8A8_DYNAMIC layer "
                                       "needs weight, weight_scale$"),
    (_set(f"{Q}.weight_scale", torch.full((64, 1), float("nan"))), None,
     rf"^{Q}.weight_scale: scales must be finite and positive; the checkpoint is corrupt$"),
    (_set(f"{Q}.weight_scale", torch.zeros(64, 1)), None, rf"^{Q}.weight_scale: scales must be finite and positive"),
    (_set(f"{Q}.weight_scale", torch.ones(64, 2)), None, rf"^{Q}.weight_scale: a per-channel \[N\] or \[N, 1\]"),
    (_set(f"{Q}.weight_offset", torch.ones(64, 1)), None, rf"^{Q}.weight_offset: non-zero weight offsets "
                                                          r"\(asymmetric weights\) are not served here"),
    (_set(f"{Q}.weight", torch.zeros(64, 64)), None, rf"^{Q}.weight: an int8 \[N, K\] weight expected"),
    (None, _set(f"{Q}.weight", "W4A8_DYNAMIC"), rf"^{Q}.weight: quant type 'W4A8_DYNAMIC' is not served here; "
                                                "msmodelslim W8A8_DYNAMIC, W8A8 .* are$"),
    (None, _set("model_quant_type", "W4A16"), r"model_quant_type 'W4A16' is not served here"),
    (None, _set(f"{Q}.weight", "FLOAT"), r"^the shards of model.layers.0.self_attn.qkv_proj have different quant "
                                         "types"),
    (None, _drop(f"{Q}.weight"), rf"^quant_model_description.json has no entry for {Q}.weight$"),
    (None, _set("lm_head.weight", "W8A8_DYNAMIC"), r"^lm_head.weight: quant type 'W8A8_DYNAMIC' is not served here; "
                                                   "only the decoder's linear layers"),
    (None, _set("kv_quant_type", "C8"), r"kv_quant_type 'C8' \(attention / KV-cache quantization\) is not served"),
])
def test_a_bad_checkpoint_is_one_clear_error(dynamic_dir, tmp_path, tensors, desc, match):
    with pytest.raises(ValueError, match=match):
        run(edited(dynamic_dir, tmp_path / "bad", tensors, desc))


@pytest.mark.parametrize("tensors, match", [
    (_set(f"{Q}.deq_scale", torch.full((64,), float("nan"))), rf"^{Q}.deq_scale: scales must be finite and positive"),
    (_set(f"{Q}.input_scale", torch.zeros(1)), rf"^{Q}.input_scale: scales must be finite and positive"),
    (_set(f"{Q}.input_offset", torch.tensor([0.5])), rf"^{Q}.input_offset: an integer input offset in \[-128, 127\]"),
    (_drop(f"{Q}.quant_bias"), rf"^{Q}.quant_bias is missing from the checkpoint: a W8A8 layer needs weight, "
                               "input_scale, input_offset, deq_scale, quant_bias$"),
    (_set("model.layers.0.self_attn.k_proj.input_scale", torch.tensor([0.5])),
     r"^the shards of model.layers.0.self_attn.qkv_proj have different input_scales"),
])
def test_a_bad_static_checkpoint_is_one_clear_error(static_dir, tmp_path, tensors, match):
    with pytest.raises(ValueError, match=match):
        run(edited(static_dir, tmp_path / "bad", tensors))


@pytest.mark.parametrize("quantization", ["w8a8", "w8a16", "compressed-tensors", "bitsandbytes"])
def test_quantizing_an_msmodelslim_checkpoint_again_is_one_clear_error(dynamic_dir, quantization):
    with pytest.raises(ValueError, match=rf"is an msmodelslim int8 checkpoint \(quant_model_description.json\), "
                                         rf"served as stored; load it without --quantization {quantization}$"):
        run(dynamic_dir, quantization=quantization)


def test_static_w8a8_under_tensor_parallel_gives_the_single_process_tokens(tiny_qwen2_dir, tmp_path):
    """-tp 2: deq_scale and quant_bias split with the output rows of q/k/v and gate/up, kept whole (quant_bias added
    on rank 0 only) for o/down, the per-tensor input scale and offset on both ranks. (Static activations quantize
    the same on every rank; dynamic ones are quantized per rank's slice of a row, so W8A8_DYNAMIC's logprobs move.)"""
    ckpt = write_msmodelslim(tiny_qwen2_dir, tmp_path / "ckpt", "W8A8")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    results = []
    for tp in (1, 2):
        llm = LLM(str(ckpt), device="cpu", dtype="float32", kv_cache_memory="8MiB", skip_tokenizer_init=True,
                  max_model_len=256, tensor_parallel_size=tp)
        try:
            results.append(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params))
        finally:
            llm.engine.shutdown()
    single, parallel = results
    assert tokens(single) == tokens(parallel)
    for a, b in zip(single, parallel):
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-3 for t in la)  # fp32 partial sums, reordered
