"""Continuous batching with a token budget: running requests first, then chunks of waiting prefills;
when blocks run out, the newest running request is preempted and recomputed later."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from npu_infer.engine.block_manager import BlockManager
from npu_infer.engine.request import Request, Status


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens this step)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


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
                 policy: str = "fcfs"):
        self.blocks = block_manager
        self.policy = policy  # "priority": waiting requests by (priority, arrival); the lowest priority gives way
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self.num_preemptions = 0

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
        self.num_preemptions += 1
        if self.policy == "priority":
            self._insert_by_priority(request)
        else:
            self.waiting.appendleft(request)

    def finish(self, request: Request, reason: str) -> None:
        """Take a request out wherever it is and give its blocks back."""
        if request.status is Status.FINISHED:
            return
        if request.status is Status.RUNNING:
            self.running.remove(request)  # at most max_num_seqs long
        else:
            self.waiting.remove(request)
        self.blocks.free(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
