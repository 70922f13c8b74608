"""LLM(...) as vLLM's: its harmless keyword arguments accepted with one warning each, the others refused, a
progress bar by default, and the model's generation config when no SamplingParams are given."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from npu_infer import LLM, SamplingParams

SMALL = {"kv_cache_memory": "16MiB", "skip_tokenizer_init": True, "device": "cpu", "max_num_batched_tokens": 256}
PROMPT = {"prompt_token_ids": [5, 6, 7, 8, 9]}


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llama-gen")
    shutil.copytree(tiny_llama_dir, out, dirs_exist_ok=True)
    (out / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 4}))
    return out


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), **SMALL)


def test_vllm_keyword_arguments_warn_once_each(model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        llm = LLM(str(model_dir), enforce_eager=True, swap_space=4, disable_log_stats=True,
                  kv_cache_memory_bytes="8MiB", tokenizer_mode="auto", **{k: v for k, v in SMALL.items()
                                                                          if k != "kv_cache_memory"})
    lines = [r.getMessage() for r in caplog.records if "accepted for vLLM compatibility" in r.getMessage()]
    assert [line.split(" is accepted")[0] for line in lines] == [
        "disable_log_stats=True", "enforce_eager=True", "swap_space=4", "tokenizer_mode='auto'"]
    assert llm.engine.config.kv_cache_memory == 8 * 2**20  # kv_cache_memory_bytes is vLLM's name


def test_refused_and_unknown_keyword_arguments(model_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' is not supported"):
        LLM(str(model_dir), kv_cache_dtype="fp8", **SMALL)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_modle_len'"):
        LLM(str(model_dir), max_modle_len=64, **SMALL)
    with pytest.raises(TypeError, match="kv_cache_memory twice"):
        LLM(str(model_dir), kv_cache_memory_bytes="8MiB", **SMALL)


def test_no_sampling_params_takes_the_generation_config(llm):
    assert llm.get_default_sampling_params().max_tokens == 4
    default = llm.generate(PROMPT, use_tqdm=False)[0].outputs[0]
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0].outputs[0]
    assert len(default.token_ids) <= 4 and default.token_ids == greedy.token_ids


def test_generation_config_vllm_keeps_vllms_defaults(model_dir):
    llm = LLM(str(model_dir), generation_config="vllm", **SMALL)
    assert llm.get_default_sampling_params() == SamplingParams()


def test_progress_bar_by_default(llm, capsys):
    llm.generate([PROMPT, PROMPT], SamplingParams(max_tokens=2))
    err = capsys.readouterr().err
    assert "Processed prompts: 100%" in err and "2/2" in err and "est. speed input:" in err
    llm.generate(PROMPT, SamplingParams(max_tokens=2), use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err
