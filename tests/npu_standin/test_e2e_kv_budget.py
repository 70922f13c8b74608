"""KV-cache sizing through the NPU code path: the numbers torch.npu reports become the budget the seed describes.

budget = total * gpu_memory_utilization;  peak = init_free - lowest free during profile_run;
kv = budget - peak;  blocks = kv // (2 * layers * block_size * kv_heads * head_dim * dtype_bytes)
"""

from __future__ import annotations

import gc
import json
import logging

import pytest

from npu_infer import LLM, SamplingParams

from . import install, set_memory, uninstall
from ._e2e import simulate_memory

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture
def standin(tiny_qwen2_dir):  # the model is made before the stand-in is installed (transformers probes torch_npu)
    module = install()
    try:
        yield module
    finally:
        uninstall()


def block_bytes(model_dir, block_size: int = 128, dtype_bytes: int = 2) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * block_size * cfg["num_key_value_heads"] * head_dim * dtype_bytes


def test_kv_budget_follows_the_seed_formula_with_the_npu_numbers(tiny_qwen2_dir, standin, monkeypatch, caplog):
    total, init_free = 8 * GiB, 6 * GiB               # another process holds 2 GiB of this card
    weights, activation, non_torch = 3 * GiB, GiB // 2, GiB // 2 - 2 * MiB
    set_memory(total=total, free=init_free)
    simulate_memory(monkeypatch, weights=weights, activation=activation, non_torch=non_torch)
    caplog.set_level(logging.INFO, logger="npu_infer.worker.worker")

    llm = LLM(str(tiny_qwen2_dir), device="npu", gpu_memory_utilization=0.5, max_num_batched_tokens=256,
              max_num_seqs=4, skip_tokenizer_init=True)

    budget = int(total * 0.5)                          # 4 GiB, below the 6 GiB free at start
    lowest_free = init_free - weights - non_torch - activation
    peak = init_free - lowest_free                     # 4 GiB - 2 MiB
    kv = budget - peak                                 # 2 MiB
    expected_blocks = kv // block_bytes(tiny_qwen2_dir)
    assert expected_blocks == 2 * MiB // (32 * 1024) == 64
    memory = llm.engine.memory
    assert (memory["total"], memory["init_free"], memory["budget"]) == (total, init_free, budget)
    assert (memory["peak"], memory["activation_peak"], memory["kv_bytes"]) == (peak, activation, kv)
    assert memory["num_blocks"] == llm.engine.block_manager.num_blocks == expected_blocks
    assert llm.engine.config.block_size == 128

    line, = [r.getMessage() for r in caplog.records if "KV budget" in r.getMessage()]
    for text in ("total 8.00 GiB", "free at start 6.00 GiB", "budget 4.00 GiB (x0.50)", "activation peak 0.50 GiB",
                 "ours 3.50 GiB (tensors 3.00 GiB", "outside the allocator 0.50 GiB",
                 "peak = ours + activations above what stays = 4.00 GiB", f"= {expected_blocks} blocks of 128 tokens"):
        assert text in line, (text, line)
    # and the cache is usable: a request runs
    out = llm.generate([{"prompt_token_ids": list(range(3, 40))}], SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4


def test_budget_above_free_memory_is_refused_on_npu(tiny_qwen2_dir, standin):
    set_memory(total=8 * GiB, free=2 * GiB)  # others use 6 GiB of the card
    with pytest.raises(ValueError, match=r"--gpu-memory-utilization 0.9 asks for 7.20 GiB but only 2.00 GiB of "
                                         r"8.00 GiB was free at start .* lower it to 0.25"):
        LLM(str(tiny_qwen2_dir), device="npu", max_num_batched_tokens=256, max_num_seqs=4, skip_tokenizer_init=True)


def test_too_little_kv_for_one_sequence_says_what_to_lower(tiny_qwen2_dir, standin, monkeypatch):
    set_memory(total=8 * GiB, free=6 * GiB)
    simulate_memory(monkeypatch, weights=3 * GiB, activation=GiB // 2, non_torch=GiB // 2 - 64 * 1024)
    with pytest.raises(ValueError, match="lower --max-model-len or give the cache more memory"):
        LLM(str(tiny_qwen2_dir), device="npu", gpu_memory_utilization=0.5, max_num_batched_tokens=256,
            max_num_seqs=4, skip_tokenizer_init=True)


def test_kv_budget_counts_the_profile_run_once_on_measured_memory(tiny_qwen2_dir, monkeypatch, caplog):
    """On the strict stand-in the memory is measured as a caching allocator keeps it: after the profile run the
    allocator still reserves its activations, so free memory read then would count them a second time on top
    of the allocator's peak.  The budget reads free memory after empty_cache(): the activations count once."""
    from npu_infer.worker.worker import Worker

    from . import strict_device
    install(strict=True)
    try:
        memory = strict_device().memory
        set_memory(total=8 * GiB, free=6 * GiB)  # another process holds 2 GiB
        seen = {}
        profile_run = Worker.profile_run

        def recording_profile_run(self):
            profile_run(self)  # two passes, the peak reset between them: the first one's peak is kept
            seen.update(reserved=memory.reserved, allocated=memory.allocated,
                        peak=max(memory.peak, self.memory["peak_fresh"]))
        monkeypatch.setattr(Worker, "profile_run", recording_profile_run)
        caplog.set_level(logging.INFO, logger="npu_infer.worker.worker")
        llm = LLM(str(tiny_qwen2_dir), device="npu", gpu_memory_utilization=0.5, max_num_batched_tokens=2048,
                  max_num_seqs=4, skip_tokenizer_init=True)
        mem = llm.engine.memory
    finally:
        uninstall()
    activations = seen["peak"] - seen["allocated"]
    assert activations > MiB  # the profile run's logits and attention buffers
    assert seen["reserved"] - seen["allocated"] >= activations - 2 * MiB  # still reserved when it returned
    stays = -(-seen["allocated"] // (2 * MiB)) * (2 * MiB)  # what stays reserved after empty_cache()
    assert mem["used"] == stays and mem["in_use"] == seen["allocated"]
    assert mem["peak"] == stays + activations  # counted once; the reading before empty_cache() counted it twice
    assert mem["kv_bytes"] == 4 * GiB - mem["peak"]
    line, = [r.getMessage() for r in caplog.records if "KV budget" in r.getMessage()]
    assert "outside the allocator" in line and "activation peak" in line


def test_serving_stays_within_the_profiled_peak_on_the_paged_path(tiny_llama_dir):
    """What the budget promises: while serving, the device holds at most the KV cache plus the profile run's
    peak.  The plain-torch backend (the CUDA stand-in) gathers each decode's K/V padded to the longest sequence
    and a chunk's whole context per layer, shapes the no-cache prefill never has: a long sequence decoding
    beside short ones, with logprobs and prompt logprobs, must stay within the peak profile_run measured."""
    from ._cuda import strict_cuda
    with strict_cuda() as dev:
        llm = LLM(str(tiny_llama_dir), device="cuda", dtype="bfloat16", max_model_len=512, max_num_batched_tokens=64,
                  max_num_seqs=16, kv_cache_memory="16MiB", skip_tokenizer_init=True)
        mem = llm.engine.memory
        profiled = mem["peak"] - mem["used"] + mem["in_use"]  # the allocator's peak the budget counted
        kv = sum(c.numel() * c.element_size() for c in llm.engine.executor.worker.kv_caches)
        dev.memory.reset_peak()
        long = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, prompt_logprobs=5, ignore_eos=True)
        short = SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.1, max_tokens=40, logprobs=5,
                               ignore_eos=True)
        prompts = [{"prompt_token_ids": [3 + i % 250 for i in range(500)]}]
        prompts += [{"prompt_token_ids": [5 + i, 6, 7, 8, 9]} for i in range(15)]
        outs = llm.generate(prompts, [long] + [short] * 15)
        serving = dev.memory.peak
        del llm
        gc.collect()
    assert [len(o.outputs[0].token_ids) for o in outs] == [8] + [40] * 15
    assert serving - kv <= profiled, (f"serving peaked {serving - kv - profiled} bytes above the profile run "
                                      f"(profiled activations {mem['activation_peak']})")
    assert mem["activation_paged"] > mem["activation_fresh"]  # here the paged step is the worst case
