"""Continuous batching with a token budget: running requests first, then chunks of waiting prefills;
when blocks run out, the newest running request is preempted and recomputed later. Every change of a
request's state happens here: admitted, preempted, computed, a token appended, stopped, finished."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from npu_infer.engine.block_manager import BlockManager
from npu_infer.engine.detokenizer import find_stop
from npu_infer.engine.request import Request, Status
from npu_infer.worker.step_io import StepOutput

logger = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens this step)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


@dataclass
class StepUpdate:
    """What one step changed, for the engine to turn into outputs."""
    new_tokens: list[tuple[Request, int, tuple | None]] = field(default_factory=list)  # (request, token, logprobs)
    prompt_logprobs: list[tuple[Request, int, list]] = field(default_factory=list)  # (request, first position, rows)
    failed: list[tuple[Request, str | Exception]] = field(default_factory=list)  # its own computation failed
    finished: list[Request] = field(default_factory=list)


class WaitingQueue:
    """First-in first-out, with O(1) removal from anywhere (aborting W queued requests costs O(W), not O(W^2))."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, Request] = OrderedDict()

    def append(self, request: Request) -> None:
        self._items[request.request_id] = request

    def appendleft(self, request: Request) -> None:
        self._items[request.request_id] = request
        self._items.move_to_end(request.request_id, last=False)

    def insert(self, index: int, request: Request) -> None:
        """O(W): only the priority policy places a request in the middle."""
        items = list(self._items.items())
        items.insert(index, (request.request_id, request))
        self._items = OrderedDict(items)

    def popleft(self) -> Request:
        return self._items.popitem(last=False)[1]

    def remove(self, request: Request) -> bool:
        return self._items.pop(request.request_id, None) is not None

    def __getitem__(self, index: int) -> Request:
        if index != 0:
            raise IndexError("only the head of the waiting queue can be read")
        return next(iter(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items.values())


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "fcfs", eos_token_ids: set[int] | None = None, max_model_len: int | None = None):
        self.blocks = block_manager
        self.eos_token_ids = eos_token_ids or set()
        self.max_model_len = max_model_len
        self.policy = policy  # "priority": waiting requests by (priority, arrival); the lowest priority gives way
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.finished_req_ids: list[str] = []  # finished since the last step input: the workers drop their state

    def add(self, request: Request) -> None:
        if self.policy == "priority":
            self._insert_by_priority(request)
        else:
            self.waiting.append(request)

    def _insert_by_priority(self, request: Request) -> None:
        key = (request.priority, request.arrival_time)
        index = next((i for i, r in enumerate(self.waiting) if (r.priority, r.arrival_time) > key), len(self.waiting))
        self.waiting.insert(index, request)

    def _victim_index(self) -> int:
        """The running request that gives way: the newest, or under the priority policy the least urgent."""
        if self.policy == "priority":
            return max(range(len(self.running)),
                       key=lambda k: (self.running[k].priority, self.running[k].arrival_time))
        return len(self.running) - 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.blocks.allocate(request, num_new):
                index = self._victim_index()
                victim = self.running.pop(index)
                if index < i:  # keep pointing at `request`
                    i -= 1
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append((request, num_new))
                scheduled_ids.add(request.request_id)
                budget -= num_new
                i += 1
        # A victim may have been scheduled earlier in this step: drop it from the plan.
        out.scheduled = [(r, n) for r, n in out.scheduled if r.status is Status.RUNNING]
        if out.preempted:
            return out  # no room for newcomers this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.num_computed_tokens == 0 and not request.block_ids:
                cached = self.blocks.find_cached_prefix(request)
                request.num_computed_tokens = cached
                request.num_cached_tokens = cached
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.blocks.allocate(request, num_new):
                self.blocks.free(request)
                request.num_computed_tokens = 0
                request.num_cached_tokens = 0
                break
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            out.scheduled.append((request, num_new))
            budget -= num_new
        return out

    def _preempt(self, request: Request) -> None:
        self.blocks.free(request)
        request.status = Status.PREEMPTED
        request.num_computed_tokens = 0
        request.num_blocks_on_workers = None  # it resumes with new blocks: the workers start it over
        self.num_preemptions += 1
        if self.policy == "priority":
            self._insert_by_priority(request)
        else:
            self.waiting.appendleft(request)

    def update_from_output(self, scheduled: list[tuple[Request, int]], result: StepOutput) -> StepUpdate:
        """Apply what a step computed: tokens computed, full blocks cached, the sampled token appended (with its
        text), stop conditions checked, finished requests freed. A request whose own computation failed is
        reported in `failed` and left to the engine, which ends its whole user request."""
        update = StepUpdate()
        now = time.monotonic()
        for request, num_new in scheduled:
            request.num_computed_tokens += num_new
            self.blocks.cache_full_blocks(request)
            request_id = request.request_id
            error = result.errors.get(request_id)
            if error is not None:
                update.failed.append((request, error))
                continue
            rows = result.prompt_logprobs.get(request_id)
            if rows is not None:
                update.prompt_logprobs.append((request, request.num_computed_tokens - num_new, rows))
            token = result.sampled.get(request_id)
            if token is None:
                continue
            if request.first_token_time is None:
                request.first_token_time = now
            try:
                reason = self._append(request, token)
            except Exception as exc:  # noqa: BLE001 -- this request's own failure (e.g. its detokenizer)
                update.failed.append((request, exc))
                continue
            update.new_tokens.append((request, token, result.logprobs.get(request_id)))
            if reason is not None:
                self.finish(request, reason)
                update.finished.append(request)
        return update

    def _append(self, request: Request, token: int) -> str | None:
        """Append a sampled token (to the grammar and the text too); why the request stops here, or None."""
        p = request.params
        request.token_ids.append(token)
        rules = request.logits_rules
        if rules is not None and not rules.accept(token):
            # Only when a grammar and another rule disagree (e.g. min_tokens bans the EOS the grammar needs).
            logger.warning("request %s: token %d breaks its structured output; stopping it", request.request_id,
                           token)
            return "abort"
        new_text = ""
        if request.detokenizer is not None:
            new_text = request.detokenizer.step(token)
            request.text += new_text
        num_out = request.num_tokens - request.num_prompt_tokens
        if num_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop"
            if token in p.stop_token_ids:
                request.stop_reason = token
                return "stop"
            if p.stop_strings and new_text:
                hit = find_stop(request.text, len(new_text), p.stop_strings)
                if hit is not None:
                    stop, index = hit
                    request.text = request.text[:index + (len(stop) if p.include_stop_str_in_output else 0)]
                    request.stop_reason = stop
                    return "stop"
        if rules is not None and rules.grammar_finished():
            return "stop"
        if p.max_tokens is not None and num_out >= p.max_tokens:
            return "length"
        if self.max_model_len is not None and request.num_tokens >= self.max_model_len:
            return "length"
        return None

    def finish(self, request: Request, reason: str) -> bool:
        """Take a request out wherever it is and give its blocks back; False if it had already finished."""
        if request.status is Status.FINISHED:
            return False
        if request.status is Status.RUNNING:
            self.running.remove(request)  # at most max_num_seqs long
        else:
            self.waiting.remove(request)
        self.blocks.free(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
        self.finished_req_ids.append(request.request_id)
        return True

    def take_finished_req_ids(self) -> list[str]:
        """Requests finished since the last call: the next step input tells the workers to drop them."""
        ids, self.finished_req_ids = self.finished_req_ids, []
        return ids
