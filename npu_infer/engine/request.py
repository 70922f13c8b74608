"""A request in the engine: its tokens, its blocks, how far it has been computed, and why it finished."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from npu_infer.sampling import SamplingParams

if TYPE_CHECKING:
    from npu_infer.engine.detokenizer import IncrementalDetokenizer
    from npu_infer.engine.logits_rules import RequestLogitsRules


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    index: int = 0                      # which of the parent's n completions this is
    parent_id: str = ""                 # the user request it belongs to (its own id when n == 1)
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    token_ids: list[int] = field(default_factory=list)   # prompt + output
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0          # prompt tokens served from the prefix cache
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks so far
    num_blocks_on_workers: int | None = None  # of block_ids, how many the workers hold; None: not this request
    cache_salt: str | None = None       # prefix-cache isolation: only requests with the same salt share blocks
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None    # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    text: str = ""
    num_output_tokens_sent: int = 0     # DELTA outputs: how much of the output went out already
    text_sent: int = 0
    first_token_time: float | None = None
    priority: int = 0                   # lower runs first under the priority scheduling policy
    detokenizer: IncrementalDetokenizer | None = field(default=None, repr=False)   # None: no text wanted
    logits_rules: RequestLogitsRules | None = field(default=None, repr=False)      # None: nothing to mask

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.parent_id = self.parent_id or self.request_id
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
