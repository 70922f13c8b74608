"""Model files are input too: an index whose weight_map points outside the model directory, and a GGUF header
whose sizes would allocate without bound, are refused with one sentence before anything is opened or allocated."""
from __future__ import annotations

import json
import shutil

import gguf
import pytest

from npu_infer.loaders.default_loader import weight_files
from npu_infer.loaders.gguf_loader import load_gguf_config


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_an_index_cannot_reach_outside_the_model_directory(tiny_llama_dir, tmp_path, shard):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model.safetensors",
                                                                                    "b": shard}}))
    with pytest.raises(ValueError, match="outside the model directory"):
        weight_files(str(model), "auto")


def test_an_index_inside_the_directory_is_followed(tiny_llama_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model.safetensors"}}))
    assert weight_files(str(model), "auto") == [model / "model.safetensors"]


def header_only_gguf(path, context_length: int, hidden: int = 64):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_vocab_size(256)
    w.add_context_length(context_length)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(128)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("context_length, hidden, message", [
    (2**31, 64, "max_position_embeddings = 2147483648 is out of range"),
    (4096, 2**30, "hidden_size"),
])
def test_gguf_header_sizes_are_bounded(tmp_path, context_length, hidden, message):
    path = header_only_gguf(tmp_path / "big.gguf", context_length, hidden)
    with pytest.raises(ValueError, match=message):
        load_gguf_config(path)


def test_a_plausible_gguf_header_passes(tmp_path):
    config = load_gguf_config(header_only_gguf(tmp_path / "ok.gguf", 4096))
    assert config.max_position_embeddings == 4096
