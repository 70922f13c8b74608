"""Bad input is a clear ValueError where it enters, and nothing is left allocated."""
from __future__ import annotations

import pytest

from npu_infer import LLM, SamplingParams
from npu_infer.config import EngineConfig
from npu_infer.platform import get_platform

from .test_engine_parity import assert_pool_whole


@pytest.fixture(scope="module")
def llm(tiny_chat_model_dir):
    return LLM(str(tiny_chat_model_dir), device="cpu", dtype="float32", kv_cache_memory="8MiB", max_model_len=64)


@pytest.mark.parametrize("prompt, params, message", [
    ("", SamplingParams(), "prompt is empty"),
    ({"prompt_token_ids": []}, SamplingParams(), "prompt is empty"),
    ("word " * 80, SamplingParams(), "max_model_len is 64"),
    ("hello there friend", SamplingParams(max_tokens=63), "maximum context length is 64 .* max_tokens 63"),
    ({"prompt_token_ids": [10**7]}, SamplingParams(), "token ids must be integers"),
])
def test_bad_requests_raise_and_leave_nothing(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], params)
    assert_pool_whole(llm)
    assert not llm.engine.has_unfinished_requests()


def test_a_bad_prompt_in_a_batch_aborts_the_good_ones_too(llm):
    with pytest.raises(ValueError):
        llm.generate(["fine", ""], SamplingParams(max_tokens=4))
    assert_pool_whole(llm)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens must be at least 1"),
    ({"temperature": -0.1}, "temperature must be non-negative"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -3}, "top_k"),
    ({"n": 0}, "n must be at least 1"),
    ({"stop": [""]}, "stop strings must not be empty"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_unknown_device_and_bad_config():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        get_platform("tpu")
    with pytest.raises(ValueError, match="unknown load format"):
        EngineConfig(model="x", load_format="zip")
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        EngineConfig(model="x", block_size=12)
    with pytest.raises(ValueError, match="memory size"):
        EngineConfig(model="x", kv_cache_memory="lots")


def test_npu_without_torch_npu_says_what_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # as on a machine without it: import fails
    with pytest.raises(RuntimeError, match=r"needs torch_npu and CANN.*npu_infer\[npu\]"):
        get_platform("npu")


def test_abort_returns_blocks(llm):
    llm.engine.add_request("a", "hello there", SamplingParams(max_tokens=30, ignore_eos=True))
    llm.engine.step()
    assert llm.engine.block_manager.num_free_blocks < llm.engine.block_manager.num_blocks
    llm.engine.abort_request("a")
    assert_pool_whole(llm)
