"""npu_infer.loaders.gguf_loader: config / tokenizer / weights from GGUF files.

Checked against transformers' own GGUF support on the real SmolLM2-135M
Q4_1 file, and against ground truth on tiny Llama / Qwen2 files written here
the way llama.cpp's converter writes them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from npu_infer.loaders.gguf_loader import (
    gguf_tensor_name_to_hf,
    is_gguf_file,
    iterate_gguf_weights,
    load_gguf_config,
    load_gguf_tokenizer,
)

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog. 12345 + 678 = ?",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Unicode: héllo wörld — 你好, مرحبا 🙂",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def _split(path: str) -> tuple[str, str]:
    return os.path.dirname(path), os.path.basename(path)


def _hf_gguf_model(path: str):
    pytest.importorskip("accelerate")  # transformers requires it for GGUF loading
    from transformers import AutoModelForCausalLM

    d, name = _split(path)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)


def _expected_state_dict(model) -> dict[str, torch.Tensor]:
    sd = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied: not a separate tensor in the file
    return sd


# --------------------------------------------------------------------------- #
# SmolLM2 (real file) vs transformers
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def our_smollm2_weights(smollm2_gguf):
    return list(iterate_gguf_weights(smollm2_gguf, show_progress=False))


@pytest.fixture(scope="module")
def hf_smollm2_state_dict(smollm2_gguf):
    return _expected_state_dict(_hf_gguf_model(smollm2_gguf))


def test_is_gguf_file(smollm2_gguf, tmp_path):
    assert is_gguf_file(smollm2_gguf)
    txt = tmp_path / "x.gguf"
    txt.write_text("not a gguf")
    assert not is_gguf_file(txt)
    assert not is_gguf_file(tmp_path / "missing.gguf")
    assert not is_gguf_file(tmp_path)


def test_config_matches_transformers(smollm2_gguf):
    from transformers import AutoConfig, LlamaConfig

    d, name = _split(smollm2_gguf)
    ref = AutoConfig.from_pretrained(d, gguf_file=name)
    ours = load_gguf_config(smollm2_gguf)
    assert isinstance(ours, LlamaConfig)
    for field in (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert ours.rope_parameters["rope_type"] == "default"
    # the values themselves (SmolLM2-135M)
    assert (ours.hidden_size, ours.num_hidden_layers, ours.num_attention_heads, ours.num_key_value_heads) == (
        576,
        30,
        9,
        3,
    )
    assert ours.tie_word_embeddings is True
    assert ours.architectures == ["LlamaForCausalLM"]


def test_tokenizer_matches_transformers(smollm2_gguf):
    from transformers import AutoTokenizer

    d, name = _split(smollm2_gguf)
    ref = AutoTokenizer.from_pretrained(d, gguf_file=name)
    tok = load_gguf_tokenizer(smollm2_gguf)
    assert tok.is_fast
    assert len(tok) == len(ref) == 49152
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids)
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    msgs = [{"role": "user", "content": "Hi there"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert prompt == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_weights_match_transformers(our_smollm2_weights, hf_smollm2_state_dict):
    ours = dict(our_smollm2_weights)
    assert len(ours) == len(our_smollm2_weights), "duplicate tensor names"
    assert set(ours) == set(hf_smollm2_state_dict)
    assert "lm_head.weight" not in ours  # tied embeddings in this file
    for name, ref in hf_smollm2_state_dict.items():
        t = ours[name]
        assert t.dtype == torch.float32, name
        assert t.shape == ref.shape, (name, t.shape, ref.shape)
        if not torch.equal(t, ref):  # bit-exact in practice; fp32 rounding allowed
            torch.testing.assert_close(t, ref, rtol=1e-6, atol=1e-7, msg=name)


def test_weight_names_and_shapes(our_smollm2_weights):
    ours = dict(our_smollm2_weights)
    assert ours["model.embed_tokens.weight"].shape == (49152, 576)
    assert ours["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert ours["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert ours["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert ours["model.layers.29.mlp.gate_proj.weight"].shape == (1536, 576)
    assert ours["model.norm.weight"].shape == (576,)
    assert gguf_tensor_name_to_hf("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert gguf_tensor_name_to_hf("rope_freqs.weight") is None


# --------------------------------------------------------------------------- #
# broken files
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "fn",
    [load_gguf_config, load_gguf_tokenizer, lambda p: list(iterate_gguf_weights(p, show_progress=False))],
    ids=["config", "tokenizer", "weights"],
)
def test_truncated_header_is_a_clear_error(smollm2_gguf, tmp_path, fn):
    bad = tmp_path / "trunc.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(1000))
    assert is_gguf_file(bad)  # magic is intact
    with pytest.raises(ValueError, match=r"trunc\.gguf is not a valid GGUF file: .*truncated or corrupt"):
        fn(bad)


def test_truncated_tensor_data_is_a_clear_error(write_tiny_gguf, tmp_path):
    path, _ = write_tiny_gguf("qwen2")
    bad = tmp_path / "cut.gguf"
    data = Path(path).read_bytes()
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"cut\.gguf is not a valid GGUF file"):
        list(iterate_gguf_weights(bad, show_progress=False))


def test_not_gguf_and_missing(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ValueError, match=r"model\.gguf is not a valid GGUF file: .*magic"):
        load_gguf_config(bad)
    with pytest.raises(FileNotFoundError):
        load_gguf_config(tmp_path / "nope.gguf")


def test_unknown_architecture(write_tiny_gguf):
    path, _ = write_tiny_gguf("llama", arch_name="mamba2")
    with pytest.raises(ValueError, match=r"architecture 'mamba2' .* not supported; supported architectures: llama, qwen2"):
        load_gguf_config(path)
    with pytest.raises(ValueError, match="not supported"):
        next(iterate_gguf_weights(path, show_progress=False))


# --------------------------------------------------------------------------- #
# tiny Llama / Qwen2 round trips (ground truth, incl. qwen2 biases)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_unquantized_roundtrip_is_exact(write_tiny_gguf, arch, tie):
    path, model = write_tiny_gguf(arch, tie=tie, quant=False)
    cfg = load_gguf_config(path)
    mc = model.config
    assert cfg.model_type == arch
    assert cfg.tie_word_embeddings is tie
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(cfg, f) == getattr(mc, f), f
    assert cfg.rope_parameters["rope_theta"] == pytest.approx(mc.rope_parameters["rope_theta"])
    assert cfg.rms_norm_eps == pytest.approx(mc.rms_norm_eps)

    ours = dict(iterate_gguf_weights(path, show_progress=False))
    expected = _expected_state_dict(model)
    assert set(ours) == set(expected)
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in ours and "model.layers.1.self_attn.v_proj.bias" in ours
    for name, ref in expected.items():
        assert torch.equal(ours[name], ref), name  # q/k un-permuted exactly


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_roundtrip_matches_transformers(write_tiny_gguf, arch):
    path, model = write_tiny_gguf(arch, quant=True)
    ours = dict(iterate_gguf_weights(path, show_progress=False))
    ref = _expected_state_dict(_hf_gguf_model(path))
    assert set(ours) == set(ref)
    original = model.state_dict()
    for name, t in ours.items():
        assert t.shape == ref[name].shape, name
        torch.testing.assert_close(t, ref[name], rtol=1e-6, atol=1e-7, msg=name)
        # and close to the original weights (4/8-bit quantization error only)
        torch.testing.assert_close(t, original[name], rtol=0, atol=0.02, msg=name)


def test_gguf_weights_come_out_in_the_requested_dtype(write_tiny_gguf):
    path, _ = write_tiny_gguf("qwen2", quant=False)
    for name, t in iterate_gguf_weights(path, dtype=torch.bfloat16, show_progress=False):
        assert t.dtype == torch.bfloat16, name


def test_path_with_copy_is_not_served_stale(write_tiny_gguf, tmp_path):
    """The reader cache is keyed by path, size and mtime: a replaced file is re-read."""
    p1, _ = write_tiny_gguf("llama", quant=False)
    p2, _ = write_tiny_gguf("qwen2", quant=False)
    target = tmp_path / "model.gguf"
    shutil.copy(p1, target)
    assert load_gguf_config(target).model_type == "llama"
    os.remove(target)
    shutil.copy(p2, target)
    os.utime(target, ns=(1, 1))  # a different mtime even on coarse clocks
    assert load_gguf_config(target).model_type == "qwen2"


# Loaded into every process the PP test starts (sitecustomize): counts the tensors each rank dequantizes.
_DEQUANT_SPY = '''"""Test spy (tests/loaders/test_gguf_loader.py): one line per dequantized tensor, a file per rank."""
import os, sys
sys.path.insert(0, os.environ["GGUF_SPY_REPO"])  # this checkout's npu_infer, before the spawn sets sys.path
from npu_infer.loaders import gguf_loader
_dequantize = gguf_loader.dequantize

def dequantize(*args, **kwargs):
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_initialized() else "engine"
    with open(os.path.join(os.environ["GGUF_SPY_DIR"], f"rank-{rank}"), "a") as f:
        f.write(f"{kwargs.get('shape', args[2] if len(args) > 2 else None)}\\n")
    return _dequantize(*args, **kwargs)

gguf_loader.dequantize = dequantize
'''


def test_each_pipeline_stage_dequantizes_only_its_own_tensors(write_tiny_gguf, tmp_path, monkeypatch):
    """pp=2 over gloo: rank 0 dequantizes the embedding and layer 0, rank 1 layer 1, the final norm and the tied
    embedding it uses as its LM head; nothing of the other stage.  The tokens are pp=1's."""
    from npu_infer import LLM, SamplingParams

    path, _ = write_tiny_gguf("qwen2", tie=True)  # 2 layers: one per stage
    names = [t.name for t in gguf.GGUFReader(path).tensors]
    stage = {0: {"token_embd.weight"}, 1: {"output_norm.weight", "token_embd.weight"}}
    own = {rank: [n for n in names if n.startswith(f"blk.{rank}.") or n in stage[rank]] for rank in (0, 1)}
    assert len(names) == 2 * 12 + 2 and [len(own[0]), len(own[1])] == [13, 14]  # 9 weights + 3 biases a layer

    engine = dict(device="cpu", dtype="float32", kv_cache_memory="4MiB", skip_tokenizer_init=True, max_model_len=128,
                  max_num_seqs=4, max_num_batched_tokens=32)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1, 5, 9, 30, 7]}, {"prompt_token_ids": list(range(40, 73))}]
    llm = LLM(path, **engine)
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    del llm

    spy, counts = tmp_path / "spy", tmp_path / "counts"
    spy.mkdir(), counts.mkdir()
    (spy / "sitecustomize.py").write_text(_DEQUANT_SPY)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(spy), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("GGUF_SPY_REPO", str(Path(__file__).resolve().parents[2]))
    monkeypatch.setenv("GGUF_SPY_DIR", str(counts))
    llm = LLM(path, pipeline_parallel_size=2, **engine)
    try:
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.engine.shutdown()
    seen = {f.name: len(f.read_text().splitlines()) for f in counts.iterdir()}
    assert seen == {"rank-0": len(own[0]), "rank-1": len(own[1])}  # each rank loaded, so each got all of its own
    assert tokens == reference
