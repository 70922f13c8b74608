"""What crosses to the workers each step: a request's data once, then only what changed, so a decode step does
not grow with the tokens generated; a preempted request resumes on the workers with its whole history (penalties
equal transformers' under preemption and prefix caching); a step naming a request the workers never got is
refused."""
from __future__ import annotations

import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM

from npu_infer import LLM, SamplingParams
from npu_infer.worker.model_runner import ModelRunner
from npu_infer.worker.step_io import SeqChunk, StepInput

from .test_engine_parity import assert_pool_whole, random_prompts

ENGINE = dict(device="cpu", dtype="float32", kv_cache_memory="8MiB", skip_tokenizer_init=True, max_model_len=128,
              max_num_seqs=8, block_size=16)
PENALIZED = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=32, ignore_eos=True)


def record_steps(llm: LLM) -> list[StepInput]:
    steps = []
    execute = llm.engine.executor.execute

    def record(step: StepInput):
        steps.append(step)
        return execute(step)

    llm.engine.executor.execute = record
    return steps


def test_a_request_crosses_once_then_only_its_changes(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), **ENGINE)
    steps = record_steps(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in random_prompts(256)], PENALIZED)
    assert all(len(o.outputs[0].token_ids) == 32 for o in outs)
    sent = [r.request_id for s in steps for r in s.new_requests]
    assert sorted(sent) == ["0", "1", "2", "3"]  # each request's data once (nothing was preempted)
    decodes = [s for s in steps if all(len(c.token_ids) == 1 for c in s.chunks)]
    assert len(decodes) >= 30
    for step in decodes:
        assert not step.new_requests
        assert all(len(c.new_block_ids) <= 1 for c in step.chunks)  # a new block only where one fills up
    # The step after 31 tokens each carries no more than the first decode step: no history, no block table.
    sizes = [len(pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL)) for s in decodes if len(s.chunks) == 4]
    assert max(sizes) <= sizes[0] + 16, sizes


def test_penalties_match_transformers_under_preemption_and_prefix_caching(tiny_llama_dir):
    prompts = random_prompts(256)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    expected = [reference.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   max_new_tokens=32, do_sample=False, repetition_penalty=1.3, eos_token_id=None,
                                   pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    # 12 blocks of 16 tokens cannot hold four sequences of up to 72 tokens: someone must give way, and resumes
    # with part of its own output found in the prefix cache.
    llm = LLM(str(tiny_llama_dir), **{**ENGINE, "num_gpu_blocks_override": 12, "enable_prefix_caching": True})
    steps = record_steps(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PENALIZED)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.scheduler.num_preemptions > 0
    resumed = [r for s in steps for r in s.new_requests if len(r.token_ids) > len(prompts[int(r.request_id)])]
    assert resumed  # sent again after a preemption, with the output so far
    assert_pool_whole(llm)


def test_a_step_naming_a_request_the_worker_never_got_is_refused():
    runner = ModelRunner(None, torch.device("cpu"), 16, 64, torch.float32)
    with pytest.raises(RuntimeError, match="does not hold"):
        runner.execute(StepInput([SeqChunk("ghost", [1], 0, [0], True)]))
