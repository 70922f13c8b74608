"""--generation-config: the model's generation_config.json read as vLLM reads it."""
from __future__ import annotations

import json

import pytest

from npu_infer.generation_config import sampling_defaults


def write(directory, **fields):
    (directory / "generation_config.json").write_text(json.dumps(fields))
    return str(directory)


def test_auto_reads_the_model_file_as_vllm(tmp_path):
    # Qwen2-0.5B-Instruct's file, and the fields vLLM ignores (do_sample, eos) or drops as HF defaults (top_k 50).
    model = write(tmp_path, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, do_sample=True,
                  eos_token_id=[151645, 151643], max_new_tokens=64)
    assert sampling_defaults("auto", model) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                "repetition_penalty": 1.05, "max_tokens": 64}
    assert sampling_defaults("auto", write(tmp_path, top_k=50, temperature=1.0, top_p=0.9)) == {"top_p": 0.9}


def test_vllm_and_a_directory_and_overrides(tmp_path):
    model = write(tmp_path, temperature=0.7)
    assert sampling_defaults("vllm", model) == {}
    other = tmp_path / "other"
    other.mkdir()
    assert sampling_defaults(write(other, top_p=0.5), model) == {"top_p": 0.5}
    assert sampling_defaults("auto", model, {"temperature": 0.1, "max_new_tokens": 9}) == {"temperature": 0.1,
                                                                                         "max_tokens": 9}
    assert sampling_defaults("auto", None) == {}  # a GGUF file: no generation_config.json, nothing changes
    with pytest.raises(ValueError, match="no generation_config.json there"):
        sampling_defaults(str(tmp_path / "missing"), model)
    with pytest.raises(ValueError, match="unknown field"):
        sampling_defaults("auto", model, {"temprature": 0.1})
