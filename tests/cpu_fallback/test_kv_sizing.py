"""KV-cache sizing through a stand-in platform that reports chosen memory numbers (the CPU platform with
its memory queries replaced; everything else, profile_run included, runs for real)."""
from __future__ import annotations

import logging

import pytest

from npu_infer.config import EngineConfig
from npu_infer.engine.llm_engine import LLMEngine
from npu_infer.platform.cpu import CpuPlatform

GiB = 1024**3


class ChosenMemoryPlatform(CpuPlatform):
    """Reports (free, total) and a peak chosen by the test, strictly, like a device would."""
    strict_memory_budget = True

    def __init__(self, free: int, total: int, peak_extra: int):
        self.free, self.total, self.peak_extra, self.in_use = free, total, peak_extra, 0
        self.profiled = False

    def mem_get_info(self):
        return self.free, self.total

    def memory_in_use(self):
        return self.in_use

    def peak_memory(self):
        return self.in_use + self.peak_extra

    def reset_peak_memory(self):
        pass

    def default_kv_cache_cap(self):
        return None


def build(monkeypatch, model_dir, platform, **kwargs) -> LLMEngine:
    monkeypatch.setattr("npu_infer.platform.get_platform", lambda device: platform)
    config = EngineConfig(model=str(model_dir), device="cpu", dtype="float32", skip_tokenizer_init=True,
                          max_model_len=256, **kwargs)
    return LLMEngine(config)


def block_bytes(engine: LLMEngine) -> int:
    hf = engine.config.hf_config
    head_dim = hf.hidden_size // hf.num_attention_heads
    return 2 * hf.num_hidden_layers * engine.config.block_size * hf.num_key_value_heads * head_dim * 4


def test_num_blocks_follow_the_formula(monkeypatch, tiny_llama_dir, caplog):
    total, free, peak_extra = 8 * GiB, 7 * GiB, 100 * 1024**2
    platform = ChosenMemoryPlatform(free, total, peak_extra)
    with caplog.at_level(logging.INFO, logger="npu_infer.worker.worker"):
        engine = build(monkeypatch, tiny_llama_dir, platform, gpu_memory_utilization=0.5)
    mem = engine.memory
    # lowest free seen = free now - (peak - in use now) => peak = init_free - lowest_free = peak_extra here
    assert mem["peak"] == max(peak_extra, mem["weights"])
    expected_kv = int(total * 0.5) - mem["peak"]
    assert mem["kv_bytes"] == expected_kv
    assert engine.block_manager.num_blocks == expected_kv // block_bytes(engine)
    log = caplog.text
    assert "KV budget" in log and "8.00 GiB" in log and "7.00 GiB" in log and f"{mem['num_blocks']} blocks" in log


def test_budget_above_free_memory_is_a_clear_error(monkeypatch, tiny_llama_dir):
    platform = ChosenMemoryPlatform(free=2 * GiB, total=8 * GiB, peak_extra=0)
    with pytest.raises(ValueError, match="gpu-memory-utilization 0.9.*only 2.00 GiB.*lower it to 0.25"):
        build(monkeypatch, tiny_llama_dir, platform)


def test_too_little_memory_for_one_sequence_is_a_clear_error(monkeypatch, tiny_llama_dir):
    platform = ChosenMemoryPlatform(free=8 * GiB, total=8 * GiB, peak_extra=0)
    with pytest.raises(ValueError, match="KV cache holds .* tokens .* max_model_len=256"):
        build(monkeypatch, tiny_llama_dir, platform, kv_cache_memory=1024)


def test_kv_cache_memory_is_honoured_exactly(monkeypatch, tiny_llama_dir):
    platform = ChosenMemoryPlatform(free=8 * GiB, total=8 * GiB, peak_extra=0)
    engine = build(monkeypatch, tiny_llama_dir, platform, kv_cache_memory="3MiB")
    assert engine.memory["kv_bytes"] == 3 * 1024**2
    assert engine.block_manager.num_blocks == 3 * 1024**2 // block_bytes(engine)
    cache = engine.executor.worker.kv_caches
    assert sum(c.numel() * c.element_size() for c in cache) <= 3 * 1024**2


def test_cpu_platform_reads_host_memory():
    free, total = CpuPlatform().mem_get_info()
    assert 0 < free <= total
    platform = CpuPlatform()
    platform.reset_peak_memory()
    assert platform.peak_memory() >= platform.memory_in_use() > 0
