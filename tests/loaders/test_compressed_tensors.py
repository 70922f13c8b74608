"""compressed-tensors int8 checkpoints: `npu-infer quantize` writes them (config built by the compressed_tensors
package, vLLM's tensor layout), loading serves the int8 weights as stored; round trip against quantize-on-load,
and one clear error for each bad checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from npu_infer import LLM, SamplingParams
from npu_infer.cli import main as cli_main
from npu_infer.quantize import write_quantized

pytest.importorskip("compressed_tensors")
PROMPTS = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 40)]


def run(model_dir, **kwargs):
    llm = LLM(str(model_dir), device="cpu", dtype="bfloat16", kv_cache_memory="8MiB", skip_tokenizer_init=True,
              max_model_len=256, **kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    return llm.engine.executor.worker.model, [o.outputs[0].token_ids for o in outs]


# (scheme, --group-size): w8a16 per channel and per group of 32 input channels (the tiny model's K: 64 and 128).
LAYOUTS = [("w8a8", None), ("w8a16", "channel"), ("w8a16", "32")]


@pytest.fixture(scope="module", params=LAYOUTS, ids=["w8a8", "w8a16-channel", "w8a16-g32"])
def written(request, tiny_llama_dir, tmp_path_factory):
    scheme, group = request.param
    out = tmp_path_factory.mktemp(f"ct-{scheme}")
    flags = ["--group-size", group] if group else []
    assert cli_main(["quantize", "--model", str(tiny_llama_dir), "--output", str(out), "--scheme", scheme,
                     *flags]) == 0
    return scheme, group, out


def test_quantize_writes_vllms_layout(written):
    scheme, group_size, out = written
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    assert qc["format"] == {"w8a8": "int-quantized", "w8a16": "pack-quantized"}[scheme]
    group = qc["config_groups"]["group_0"]
    if group_size == "32":  # vLLM's CompressedTensorsWNA16 group layout: weight_scale [N, K / G]
        assert group["weights"]["strategy"] == "group" and group["weights"]["group_size"] == 32
    else:
        assert group["weights"]["strategy"] == "channel" and "group_size" not in group["weights"]
    assert group["weights"]["num_bits"] == 8
    assert ("input_activations" in group) == (scheme == "w8a8")
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{name}.weight_scale"].shape[1] == (64 // 32 if group_size == "32" else 1)  # K = 64
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape[1] == (128 // 32 if group_size == "32" else 1)
    if scheme == "w8a8":
        assert tensors[f"{name}.weight"].dtype == torch.int8
    else:
        k = tensors[f"{name}.weight_shape"].tolist()[1]
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        assert tensors[f"{name}.weight_packed"].shape[1] == k // 4 and f"{name}.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_round_trip_gives_the_tokens_and_weights_of_quantize_on_load(written, tiny_llama_dir, monkeypatch):
    scheme, group_size, out = written
    loaded, tokens = run(out)
    if group_size:
        monkeypatch.setenv("NPU_INFER_W8A16_GROUP_SIZE", group_size)
    on_load, want = run(tiny_llama_dir, quantization=scheme)
    assert tokens == want
    for a, b in zip(loaded.model.layers, on_load.model.layers):
        for la, lb in ((a.self_attn.qkv_proj, b.self_attn.qkv_proj), (a.mlp.down_proj, b.mlp.down_proj)):
            assert la.quant_scheme == scheme and la.weight.dtype == torch.int8
            n = la.weight.shape[0]  # a checkpoint's per-channel scale [N, 1] is quantize-on-load's [N]
            assert torch.equal(la.weight, lb.weight)
            assert torch.equal(la.weight_scale.reshape(n, -1), lb.weight_scale.reshape(n, -1))
            assert la.weight_scale.numel() == n * (la.weight.shape[1] // 32 if group_size == "32" else 1)


def corrupted(out, tmp_path, edit):
    import shutil
    target = tmp_path / "bad"
    shutil.copytree(out, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"))
    return target


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -0.5])
def test_a_corrupt_scale_tensor_is_one_clear_error(written, tmp_path, bad):
    *_, out = written

    def edit(t):
        t["model.layers.1.mlp.down_proj.weight_scale"][3, 0] = bad
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj.weight_scale: int8 weight scales must be finite"):
        run(corrupted(out, tmp_path, edit))


def test_a_missing_or_misshapen_scale_is_one_clear_error(written, tmp_path):
    _, group_size, out = written
    with pytest.raises(ValueError, match="lacks tensors: .*weight_scale"):
        run(corrupted(out, tmp_path, lambda t: t.pop("model.layers.0.self_attn.o_proj.weight_scale")))
    misshapen = "weight shape \\(3, 2\\) does not match the model's \\(64, 2\\)" if group_size == "32" else \
        "per-channel scale"
    with pytest.raises(ValueError, match=misshapen):
        run(corrupted(out, tmp_path / "2", lambda t: t.update(
            {"model.layers.0.self_attn.o_proj.weight_scale": torch.ones(3, 2)})))


def test_quantizing_an_already_quantized_checkpoint_again_is_one_clear_error(written):
    scheme, _, out = written
    other = "w8a16" if scheme == "w8a8" else "w8a8"
    with pytest.raises(ValueError, match=f"--quantization {other} .* already quantized \\(compressed-tensors\\)"):
        run(out, quantization=other)


def test_an_unsupported_compressed_tensors_scheme_is_one_clear_error(written, tmp_path):
    """4-bit weights, asymmetric weights, group-wise W8A8 (its int32 sums take one scale per row)."""
    import shutil
    scheme, _, out = written
    edits = [dict(num_bits=4), dict(symmetric=False)]
    if scheme == "w8a8":
        edits.append(dict(strategy="group", group_size=32))
    for i, edit in enumerate(edits):
        target = tmp_path / f"edit-{i}"
        shutil.copytree(out, target)
        cfg = json.loads((target / "config.json").read_text())
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"].update(edit)
        (target / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="only int8 symmetric weights, per channel with dynamic"):
            run(target)


def test_a_group_size_that_does_not_divide_every_linear_is_one_clear_error(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="model.layers.0.[a-z_.]+_proj.weight: group size 128 does not divide "
                                         "the 64 input features"):
        write_quantized(str(tiny_llama_dir), str(tmp_path / "out"), "w8a16", group_size=128)
    with pytest.raises(ValueError, match="--group-size is for w8a16"):
        write_quantized(str(tiny_llama_dir), str(tmp_path / "out"), "w8a8", group_size=32)


def test_quantize_writes_the_on_load_group_size_by_default(tiny_llama_dir, tmp_path, monkeypatch):
    from npu_infer import envs
    assert cli_main(["quantize", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "a"),
                     "--scheme", "w8a16"]) == 0
    weights = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["weights"]
    assert weights["strategy"] == "group" and weights["group_size"] == envs.NPU_INFER_W8A16_GROUP_SIZE


def test_quantize_refuses_its_own_source_as_output(tiny_llama_dir):
    with pytest.raises(ValueError, match="must differ"):
        write_quantized(str(tiny_llama_dir), str(tiny_llama_dir), "w8a8")
