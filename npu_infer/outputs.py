"""What generate() returns, shaped like vLLM's RequestOutput / CompletionOutput / Logprob."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


def add_delta(total: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a DELTA output into the running total of its request (O(new tokens)); None starts a total.

    The total is a new object, never one of the deltas, so a delta handed to one reader stays as it was."""
    if total is None:
        total = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids,
                              [CompletionOutput(c.index, "", [], None, [] if c.logprobs is not None else None)
                               for c in delta.outputs], False)
    for mine, new in zip(total.outputs, delta.outputs):
        mine.text += new.text
        mine.token_ids.extend(new.token_ids)
        if new.logprobs is not None:
            mine.logprobs.extend(new.logprobs)
        mine.cumulative_logprob = new.cumulative_logprob
        mine.finish_reason, mine.stop_reason = new.finish_reason, new.stop_reason
    if total.prompt_logprobs is None:
        total.prompt_logprobs = delta.prompt_logprobs
    total.finished, total.num_cached_tokens, total.metrics = delta.finished, delta.num_cached_tokens, delta.metrics
    return total
