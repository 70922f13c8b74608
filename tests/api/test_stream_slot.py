"""A stream holds only the newest cumulative snapshot: a reader that misses many steps costs one snapshot of
memory, and the final snapshot or an error is never overwritten."""
from __future__ import annotations

import asyncio

from npu_infer.api.async_engine import _Stream
from npu_infer.outputs import RequestOutput


def snapshot(step: int, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", None, [1], [], finished, metrics={"step": step})


def test_a_slow_reader_gets_the_newest_snapshot_and_nothing_piles_up():
    async def run():
        stream = _Stream("r", asyncio.get_running_loop())
        for step in range(10_000):
            stream.put(snapshot(step))
        assert (await stream.get()).metrics["step"] == 9_999
        stream.put(snapshot(10_000, finished=True))
        stream.put(snapshot(10_001))  # nothing comes after the final one
        final = await stream.get()
        assert final.finished and final.metrics["step"] == 10_000

    asyncio.run(run())


def test_an_error_is_never_replaced():
    async def run():
        stream = _Stream("r", asyncio.get_running_loop())
        stream.put(snapshot(1))
        stream.put(RuntimeError("the engine failed"))
        stream.put(snapshot(2))
        assert isinstance(await stream.get(), RuntimeError)

    asyncio.run(run())
