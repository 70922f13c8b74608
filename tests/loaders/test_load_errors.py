"""A file that is not what it claims, a wrong architecture, a pickle that would run code, an unknown format:
each stops start-up with one clear ValueError sentence, never a traceback from deep inside."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from npu_infer import LLM
from npu_infer.loaders.save_sharded_state import save_sharded_state
from npu_infer.loaders.tensorize import tensorize_model


def make_llm(path, **kwargs) -> LLM:
    args = dict(device="cpu", dtype="float32", kv_cache_memory="4MiB", skip_tokenizer_init=True, max_model_len=128,
                max_num_seqs=4, max_num_batched_tokens=128)
    args.update(kwargs)
    return LLM(str(path), **args)


def copy_without_weights(src, out):
    out.mkdir()
    for f in src.iterdir():
        if f.suffix not in (".safetensors", ".bin"):
            shutil.copy(f, out / f.name)
    return out


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.fixture()
def llama_copy(tiny_llama_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, out)
    return out


class Marker:
    """Unpickling this would create a file: proof that the loader executed code from the checkpoint."""
    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---- safetensors / pt --------------------------------------------------------------------------------------------

def test_truncated_safetensors(llama_copy):
    truncate(llama_copy / "model.safetensors")
    with pytest.raises(ValueError, match="is not a valid safetensors file") as exc:
        make_llm(llama_copy)
    one_line(exc)


def test_safetensors_with_a_garbage_header(llama_copy):
    (llama_copy / "model.safetensors").write_bytes(b"\xff" * 8 + b"not json at all" * 10)
    with pytest.raises(ValueError, match="is not a valid safetensors file") as exc:
        make_llm(llama_copy)
    one_line(exc)


def test_truncated_pt(tiny_llama_dir, tmp_path):
    out = copy_without_weights(tiny_llama_dir, tmp_path / "pt")
    torch.save(load_file(str(tiny_llama_dir / "model.safetensors")), out / "pytorch_model.bin")
    truncate(out / "pytorch_model.bin")
    with pytest.raises(ValueError, match="cannot be loaded as a PyTorch weights file") as exc:
        make_llm(out, load_format="pt")
    one_line(exc)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_pickled_object_is_refused_and_never_executed(tiny_llama_dir, tmp_path, how):
    out = copy_without_weights(tiny_llama_dir, tmp_path / "evil")
    marker = tmp_path / "pwned"
    payload = Marker()
    Marker.path = str(marker)
    state = {"model.embed_tokens.weight": torch.zeros(2), "x": payload}
    with open(out / "pytorch_model.bin", "wb") as f:
        torch.save(state, f) if how == "torch.save" else pickle.dump(state, f)
    assert not marker.exists()
    with pytest.raises(ValueError, match="cannot be loaded as a PyTorch weights file") as exc:
        make_llm(out)
    one_line(exc)
    assert not marker.exists(), "the checkpoint's pickle ran code"


def test_pt_holding_something_other_than_tensors(tiny_llama_dir, tmp_path):
    out = copy_without_weights(tiny_llama_dir, tmp_path / "ints")
    torch.save({"model.embed_tokens.weight": 3, "steps": [1, 2]}, out / "pytorch_model.bin")
    with pytest.raises(ValueError, match="does not hold a dict of tensors"):
        make_llm(out)


def test_directory_without_weights(tiny_llama_dir, tmp_path):
    out = copy_without_weights(tiny_llama_dir, tmp_path / "empty")
    with pytest.raises(ValueError, match=r"no weight files \(.safetensors, .bin, .pt\)"):
        make_llm(out)


# ---- architecture --------------------------------------------------------------------------------------------

def test_unsupported_architecture(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="is not supported") as exc:
        make_llm(llama_copy)
    one_line(exc)


def test_checkpoint_of_another_architecture(tiny_qwen2_dir, tmp_path):
    """Qwen2 weights (QKV biases) under a Llama config: the extra tensors are named, not silently dropped."""
    out = tmp_path / "mislabelled"
    shutil.copytree(tiny_qwen2_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="checkpoint has tensors this model does not know: .*q_proj.bias"):
        make_llm(out)


def test_checkpoint_of_another_size(tiny_llama_dir, tmp_path):
    out = tmp_path / "resized"
    shutil.copytree(tiny_llama_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        make_llm(out)


# ---- formats -------------------------------------------------------------------------------------------------

def test_unknown_load_format(tiny_llama_dir):
    with pytest.raises(ValueError, match="unknown load format 'npz'; choose one of auto, safetensors"):
        make_llm(tiny_llama_dir, load_format="npz")


def test_unknown_quantization(tiny_llama_dir):
    with pytest.raises(ValueError, match="unknown quantization 'awq'"):
        make_llm(tiny_llama_dir, quantization="awq")


def test_gguf_quantization_on_a_safetensors_directory(tiny_llama_dir):
    with pytest.raises(ValueError, match="--quantization gguf needs a .gguf file"):
        make_llm(tiny_llama_dir, quantization="gguf")


def test_gguf_format_on_a_safetensors_directory(tiny_llama_dir):
    with pytest.raises(ValueError, match="--load-format gguf needs a .gguf file"):
        make_llm(tiny_llama_dir, load_format="gguf")


def test_safetensors_format_on_a_pt_only_directory(tiny_llama_dir, tmp_path):
    out = copy_without_weights(tiny_llama_dir, tmp_path / "pt")
    torch.save(load_file(str(tiny_llama_dir / "model.safetensors")), out / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no .safetensors files in"):
        make_llm(out, load_format="safetensors")


def test_sharded_state_format_on_a_plain_checkpoint(tiny_llama_dir):
    with pytest.raises(ValueError, match="holds no model-rank-.*save-sharded-state"):
        make_llm(tiny_llama_dir, load_format="sharded_state")


def test_tensorizer_format_on_a_plain_checkpoint(tiny_llama_dir):
    with pytest.raises(ValueError, match="holds no .tensors file; write one with `npu-infer tensorize"):
        make_llm(tiny_llama_dir, load_format="tensorizer")


# ---- sharded_state ---------------------------------------------------------------------------------------------

def test_sharded_state_saved_for_another_parallel_size(tiny_qwen2_dir, tmp_path):
    save_sharded_state(str(tiny_qwen2_dir), str(tmp_path / "tp2"), tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"saved for tensor parallel 2 x pipeline parallel 1 .* runs 1 x 1") as exc:
        make_llm(tmp_path / "tp2")
    one_line(exc)


def test_truncated_sharded_state(tiny_qwen2_dir, tmp_path):
    save_sharded_state(str(tiny_qwen2_dir), str(tmp_path / "s"))
    truncate(tmp_path / "s" / "model-rank-0-part-0.safetensors")
    with pytest.raises(ValueError, match="is not a valid safetensors file") as exc:
        make_llm(tmp_path / "s")
    one_line(exc)


def test_sharded_state_of_another_model(tiny_qwen2_dir, tiny_llama_dir, tmp_path):
    """Qwen2 rank files under the Llama config: the bias names are reported."""
    save_sharded_state(str(tiny_qwen2_dir), str(tmp_path / "s"))
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "s" / "config.json")
    with pytest.raises(ValueError, match="which this model does not have"):
        make_llm(tmp_path / "s")


# ---- tensorizer --------------------------------------------------------------------------------------------------

def test_truncated_tensorizer_file(tiny_llama_dir, tmp_path):
    target = tensorize_model(str(tiny_llama_dir), str(tmp_path / "tz"))
    truncate(target, 0.6)
    with pytest.raises(ValueError, match="tensorizer file|damaged or truncated") as exc:
        make_llm(target.parent)
    one_line(exc)


def test_tensorizer_file_that_is_something_else(tiny_llama_dir, tmp_path):
    out = copy_without_weights(tiny_llama_dir, tmp_path / "fake")
    shutil.copy(tiny_llama_dir / "model.safetensors", out / "model.tensors")
    with pytest.raises(ValueError, match="is not a readable tensorizer file") as exc:
        make_llm(out)
    one_line(exc)


def test_tensorize_output_must_be_a_directory(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="--output is a directory"):
        tensorize_model(str(tiny_llama_dir), str(tmp_path / "model.tensors"))


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    from npu_infer.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["save-sharded-state", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model path") and err.count("\n") == 1
