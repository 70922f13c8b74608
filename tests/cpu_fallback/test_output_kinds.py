"""RequestOutputKind as vLLM's: DELTA outputs carry only what is new (one token per decode step), and folded
together they equal the CUMULATIVE output exactly — text held back while a stop string may still cut it, so
nothing sent is ever taken back; FINAL_ONLY gives one output, at the end."""
from __future__ import annotations

import pytest

from npu_infer import LLM, SamplingParams
from npu_infer.outputs import add_delta
from npu_infer.sampling import RequestOutputKind

from .test_engine_parity import assert_pool_whole


@pytest.fixture(scope="module")
def llm(tiny_chat_model_dir):
    return LLM(str(tiny_chat_model_dir), device="cpu", dtype="float32", kv_cache_memory="16MiB", max_model_len=256)


def run(llm, request_id: str, params: SamplingParams) -> list:
    engine = llm.engine
    engine.add_request(request_id, "Once upon a time there was", params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


def params(kind: RequestOutputKind, **extra) -> SamplingParams:
    fields = dict(n=2, temperature=1.0, seed=7, max_tokens=40, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    fields.update(extra)
    return SamplingParams(output_kind=kind, **fields)


def assert_same(folded, whole) -> None:
    assert folded.finished and whole.finished
    assert folded.prompt_logprobs == whole.prompt_logprobs
    for a, b in zip(folded.outputs, whole.outputs, strict=True):
        assert (a.index, a.text, a.token_ids, a.finish_reason, a.stop_reason) == \
               (b.index, b.text, b.token_ids, b.finish_reason, b.stop_reason)
        assert a.logprobs == b.logprobs and a.cumulative_logprob == pytest.approx(b.cumulative_logprob)


@pytest.mark.parametrize("with_stop", [False, True])
def test_deltas_fold_into_the_cumulative_output(llm, with_stop):
    extra = {}
    if with_stop:  # a stop string from the middle of what this seed writes: the text is cut there
        text = run(llm, "probe", params(RequestOutputKind.CUMULATIVE))[-1].outputs[0].text
        assert len(text) > 20
        extra = dict(stop=[text[10:14]])
    whole = run(llm, "cumulative", params(RequestOutputKind.CUMULATIVE, **extra))[-1]
    deltas = run(llm, "delta", params(RequestOutputKind.DELTA, **extra))
    folded = None
    for i, delta in enumerate(deltas):
        assert all(len(c.token_ids) <= 1 for c in delta.outputs)  # O(new tokens), not O(all)
        assert (delta.prompt_logprobs is not None) == (i == 0)    # sent once, in the first
        folded = add_delta(folded, delta)
    assert_same(folded, whole)
    if with_stop:
        assert whole.outputs[0].finish_reason == "stop" and whole.outputs[0].stop_reason == extra["stop"][0]
    assert_pool_whole(llm)


def test_final_only_gives_one_output_equal_to_the_last_cumulative(llm):
    whole = run(llm, "cumulative", params(RequestOutputKind.CUMULATIVE))
    final = run(llm, "final", params(RequestOutputKind.FINAL_ONLY))
    assert len(whole) > 1 and len(final) == 1
    assert_same(final[0], whole[-1])
