"""One request whose own computation fails ends alone: the others in its batch finish with the tokens they would
have had without it, at tp=1 and over worker processes (tp=2, pp=2), and nothing stays allocated. Prompt
logprobs survive preemption: one entry per prompt token, equal to a run that was never preempted."""
from __future__ import annotations

import pytest

from conftest import make_tiny_model
from npu_infer import LLM, SamplingParams
from npu_infer.engine.llm_engine import RequestFailedError

from .test_engine_parity import assert_pool_whole

ENGINE = dict(device="cpu", dtype="float32", max_model_len=128, max_num_seqs=16, max_num_batched_tokens=64,
              kv_cache_memory="4MiB", skip_tokenizer_init=True)
PROMPTS = [[(11 * i + 5 * j) % 250 + 1 for j in range(4 + 3 * i)] for i in range(8)]
GOOD = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-iso"), "llama", num_layers=2, num_heads=4, num_kv_heads=2)


def run_to_end(engine) -> dict[str, list[int]]:
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    return finished


def eight_and_one_bad(llm: LLM, sabotage) -> tuple[dict, dict]:
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"good-{i}", {"prompt_token_ids": prompt}, GOOD)
    bad = SamplingParams(temperature=1.0, max_tokens=10)
    engine.add_request("bad", {"prompt_token_ids": [3, 4, 5]}, bad)
    sabotage(engine, bad)
    finished = run_to_end(engine)
    return finished, engine.take_failures()


def past_the_door_logprobs(engine, params: SamplingParams) -> None:
    """A logprobs count past the vocabulary, set after the door's check: the sampler's top-k itself raises."""
    params.logprobs = 10**6


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_a_request_failing_in_the_sampler_ends_alone(tiny_dir, tp, pp):
    llm = LLM(str(tiny_dir), tensor_parallel_size=tp, pipeline_parallel_size=pp, **ENGINE)
    try:
        reference = {f"good-{i}": out.outputs[0].token_ids
                     for i, out in enumerate(llm.generate(PROMPTS, GOOD))}
        finished, failures = eight_and_one_bad(llm, past_the_door_logprobs)
        assert set(failures) == {"bad"} and isinstance(failures["bad"], RequestFailedError)
        assert "sampling failed" in str(failures["bad"]) and "bad" not in finished
        assert finished == reference  # all eight complete, with the tokens they have without the bad one
        assert_pool_whole(llm)
        # The engine (and its workers) still serve.
        assert llm.generate([PROMPTS[0]], GOOD)[0].outputs[0].token_ids == reference["good-0"]
    finally:
        llm.engine.shutdown()


def test_a_request_failing_in_detokenization_ends_alone(tiny_chat_model_dir):
    llm = LLM(str(tiny_chat_model_dir), **{**ENGINE, "skip_tokenizer_init": False})
    try:
        reference = {f"good-{i}": out.outputs[0].token_ids for i, out in enumerate(llm.generate(
            [{"prompt_token_ids": p} for p in PROMPTS], GOOD))}

        def broken_detokenizer(engine, params):
            def step(token_id):
                raise Exception("Invalid prefix encountered")  # what tokenizers' DecodeStream raises
            engine.requests["bad"].children[0].detokenizer.step = step

        finished, failures = eight_and_one_bad(llm, broken_detokenizer)
        assert set(failures) == {"bad"} and "Invalid prefix" in str(failures["bad"])
        assert finished == reference
        assert_pool_whole(llm)
    finally:
        llm.engine.shutdown()


def test_offline_generate_raises_the_failure_and_frees_everything(tiny_dir):
    llm = LLM(str(tiny_dir), **ENGINE)
    try:
        bad = SamplingParams(temperature=1.0, max_tokens=10)
        original = llm.engine.add_request

        def add_then_sabotage(request_id, prompt, params):
            original(request_id, prompt, params)
            if params is bad:
                past_the_door_logprobs(llm.engine, params)

        llm.engine.add_request = add_then_sabotage
        with pytest.raises(RequestFailedError, match="sampling failed"):
            llm.generate([PROMPTS[0], PROMPTS[1]], [GOOD, bad])
        assert_pool_whole(llm)
        assert not llm.engine.has_unfinished_requests()
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 100000000000000000000}, "top_k"),
    ({"top_k": 257}, "vocabulary size 256"),
    ({"seed": 2**64}, "64-bit"),
    ({"stop_token_ids": [256]}, "stop_token_ids"),
    ({"temperature": float("nan")}, "finite"),
    ({"top_p": float("inf")}, "finite"),
    ({"n": 129}, "at most 128"),
    ({"stop": ["x"] * 65}, "at most 64"),
])
def test_out_of_range_values_are_refused_at_the_door(tiny_dir, kwargs, message):
    llm = LLM(str(tiny_dir), **ENGINE)
    try:
        with pytest.raises(ValueError, match=message):
            llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2, **kwargs))
        assert_pool_whole(llm)
    finally:
        llm.engine.shutdown()


def test_prompt_logprobs_once_per_token_under_preemption(tiny_dir):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    prompts = [[(13 * i + 7 * j) % 250 + 1 for j in range(20 + 9 * i)] for i in range(6)]
    roomy = LLM(str(tiny_dir), **ENGINE)
    try:
        reference = roomy.generate(prompts, params)
        assert roomy.engine.scheduler.num_preemptions == 0
    finally:
        roomy.engine.shutdown()
    tight = LLM(str(tiny_dir), **{**ENGINE, "num_gpu_blocks_override": 12})  # 192 tokens for ~400 wanted
    try:
        outputs = tight.generate(prompts, params)
        assert tight.engine.scheduler.num_preemptions > 0
        assert_pool_whole(tight)
    finally:
        tight.engine.shutdown()
    for prompt, out, ref in zip(prompts, outputs, reference):
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for pos, (got, want) in enumerate(zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:]), start=1):
            assert prompt[pos] in got  # the entry is about this position's prompt token
            assert got.keys() == want.keys()
            for token, lp in got.items():
                assert lp.logprob == pytest.approx(want[token].logprob, abs=1e-4)
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
