"""A stream folds the deltas its reader has not taken yet into one: a reader that misses many steps gets all it
missed at once (nothing lost, nothing duplicated, one object however many steps), and the final output or an
error is never overwritten."""
from __future__ import annotations

import asyncio

from npu_infer.api.async_engine import _Stream
from npu_infer.outputs import CompletionOutput, RequestOutput, add_delta


def delta(step: int, finished: bool = False, prompt_logprobs=None) -> RequestOutput:
    choice = CompletionOutput(0, f"<{step}>", [step], finish_reason="length" if finished else None)
    return RequestOutput("r", None, [1], [choice], finished, prompt_logprobs, metrics={"step": step})


def test_a_slow_reader_gets_every_missed_delta_folded_into_one():
    async def run():
        stream = _Stream("r", asyncio.get_running_loop())
        first = delta(0, prompt_logprobs=[None])
        stream.put(first)
        for step in range(1, 10_000):
            stream.put(delta(step))
        got = await stream.get()
        assert got.outputs[0].token_ids == list(range(10_000))
        assert got.outputs[0].text == "".join(f"<{i}>" for i in range(10_000))
        assert got.prompt_logprobs == [None] and got.metrics["step"] == 9_999
        assert first.outputs[0].token_ids == [0]  # the engine's delta itself is left as it was
        stream.put(delta(10_000))
        assert (await stream.get()).outputs[0].token_ids == [10_000]  # only what came after the last read
        stream.put(delta(10_001, finished=True))
        stream.put(delta(10_002))  # nothing comes after the final one
        final = await stream.get()
        assert final.finished and final.outputs[0].token_ids == [10_001]

    asyncio.run(run())


def test_add_delta_rebuilds_the_whole_output():
    total = None
    for step in range(5):
        total = add_delta(total, delta(step, finished=step == 4, prompt_logprobs=[None] if step == 0 else None))
    assert total.outputs[0].token_ids == [0, 1, 2, 3, 4] and total.outputs[0].text == "<0><1><2><3><4>"
    assert total.finished and total.outputs[0].finish_reason == "length" and total.prompt_logprobs == [None]


def test_an_error_is_never_replaced():
    async def run():
        stream = _Stream("r", asyncio.get_running_loop())
        stream.put(delta(1))
        stream.put(RuntimeError("the engine failed"))
        stream.put(delta(2))
        assert isinstance(await stream.get(), RuntimeError)

    asyncio.run(run())
