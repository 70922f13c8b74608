"""AsyncEngine: the LLMEngine's step loop in one background thread, fed by a queue, streaming to asyncio.

The engine is not thread-safe, so only its thread touches it: adds and aborts travel in through a
thread-safe queue and are applied between steps, which is how concurrent HTTP requests join the running
batch. Each step's outputs go back to the event loop in one call_soon_threadsafe, into per-request slots
that keep only the newest snapshot. When nothing is running the thread blocks on its queue. torch releases
the GIL inside kernels, so the event loop keeps serving HTTP while a step runs."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from npu_infer.api.metrics import ServerMetrics
from npu_infer.engine.llm_engine import LLMEngine
from npu_infer.outputs import RequestOutput, add_delta
from npu_infer.sampling import RequestOutputKind, SamplingParams
from npu_infer.worker.executor_base import WorkerProcessError

logger = logging.getLogger(__name__)


class RequestAborted(Exception):
    """The request was aborted (client gone, or the server is shutting down) before it finished."""


class EngineDeadError(RequestAborted):
    """The engine thread has stopped; no request can be served."""


@dataclass
class _Stream:
    """One request's way back to its handler: the deltas not yet read, folded into one. A slow or stalled reader
    costs at most its request's output so far in memory, however many steps it misses."""
    request_id: str
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.monotonic)
    latest: object = None             # the unread deltas as one RequestOutput, or the exception that ends it
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    first_token: float | None = None  # engine-thread bookkeeping for the latency histograms
    last_token: float | None = None
    num_tokens: int = 0
    finished: bool = False
    merged: bool = False              # latest is this stream's own fold of several deltas (safe to extend)

    def put(self, item: object) -> None:
        """On the event loop. An exception or a final output is never replaced: nothing comes after it."""
        if isinstance(self.latest, BaseException) or getattr(self.latest, "finished", False):
            return
        if isinstance(self.latest, RequestOutput) and isinstance(item, RequestOutput):
            item = add_delta(self.latest, item) if self.merged else add_delta(add_delta(None, self.latest), item)
            self.merged = True
        self.latest = item
        self.ready.set()

    async def get(self) -> object:
        await self.ready.wait()
        self.ready.clear()
        item, self.latest, self.merged = self.latest, None, False
        return item


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None,
                 thread: threading.Thread | None = None, run_on_thread: Callable | None = None):
        self.engine = engine
        self.metrics = metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        # Either a new thread, or the one that built the engine (build()), told to run the loop by run_on_thread.
        self._thread = thread or threading.Thread(target=self._loop, name="npu-infer-engine", daemon=True)
        self._run_on_thread = run_on_thread
        self._started = False
        self._dead: BaseException | None = None
        self.died = threading.Event()  # set when the engine thread stops on an error (the server then exits 1)
        self._closing = False
        self._step_started: float | None = None  # monotonic time the running step began; None between steps
        self._snapshot = self._make_snapshot()
        # A worker process that dies between steps stops the engine now, not at the next request.
        engine.executor.register_failure_callback(lambda: self._inbox.put(("check_workers",)))
        if metrics is not None:
            metrics.attach_engine(self.snapshot)

    @classmethod
    def build(cls, make_engine: Callable[[], LLMEngine], metrics: ServerMetrics | None = None) -> AsyncEngine:
        """Build the engine on the thread that will step it, and wrap it; make_engine's errors are raised here.

        Why: libgomp (torch's OpenMP on CPU) spins its idle workers between parallel regions only while no more
        threads take part in OpenMP than there are cores. Loading and profiling the model on the main thread
        would leave the main thread's OpenMP team behind; the engine thread's team would then count as extra,
        its workers would sleep between the decode step's many short GEMVs, and each would wait for them to
        wake (decode measured ~25% slower on 2 cores). One thread doing all the compute avoids that."""
        built: dict = {}
        ready = threading.Event()
        then: queue.SimpleQueue = queue.SimpleQueue()

        def run() -> None:
            try:
                built["engine"] = make_engine()
            except BaseException as exc:  # noqa: BLE001 -- re-raised on the caller's thread
                built["error"] = exc
                return
            finally:
                ready.set()
            loop = then.get()  # the AsyncEngine's loop once started, or None when it is shut down unstarted
            if loop is not None:
                loop()

        thread = threading.Thread(target=run, name="npu-infer-engine", daemon=True)
        thread.start()
        ready.wait()
        if "error" in built:
            raise built["error"]
        return cls(built["engine"], metrics, thread=thread, run_on_thread=then.put)

    # ---- the event-loop side ----------------------------------------------------------------------------
    def start(self) -> None:
        self._started = True
        if self._run_on_thread is not None:
            self._run_on_thread(self._loop)
        else:
            self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    @property
    def closing(self) -> bool:
        return self._closing

    def step_running_for(self) -> float:
        """Seconds the current step has been running (0 between steps): the watchdog's measure of progress."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    def begin_shutdown(self) -> None:
        """Refuse new requests; those in flight go on (SIGTERM's drain)."""
        self._closing = True

    def snapshot(self) -> dict:
        """The engine's counters as of its last step (a fresh dict each step; never mutated after)."""
        return self._snapshot

    async def generate(self, request_id: str, prompt: dict, params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as deltas (RequestOutputKind.DELTA: only what is new; `add_delta` folds
        them into the whole) until it finishes; a reader that falls behind gets what it missed as one delta
        (see _Stream). Leaving early aborts the request."""
        if self._closing:
            raise RequestAborted("the server is shutting down")
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        params.output_kind = RequestOutputKind.DELTA  # O(new tokens) a step, not O(output so far)
        stream = _Stream(request_id, asyncio.get_running_loop())
        self._inbox.put(("add", stream, prompt, params, priority))
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
                if item.finished:
                    stream.finished = True
                yield item
                if stream.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort from any thread; the engine frees the request's blocks before its next step."""
        self._inbox.put(("abort", request_id))

    def abort_all(self) -> None:
        """Abort every request in flight and refuse new ones (shutdown); safe from a signal handler."""
        self._closing = True
        self._inbox.put(("abort_all",))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is in flight and stop the thread."""
        if not self._started and self._run_on_thread is not None:
            self._run_on_thread(None)  # the building thread waits to be told what to run: nothing
        elif self._thread.is_alive():
            self._inbox.put(("stop",))
            self._thread.join(timeout)
        self.engine.shutdown()

    # ---- the engine thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                if not self.engine.has_unfinished_requests():
                    self._publish_snapshot()
                    if not self._handle(self._inbox.get()):  # idle: block, no spinning
                        return
                while True:  # apply everything that arrived during the last step
                    try:
                        command = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if not self._handle(command):
                        return
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as exc:  # noqa: BLE001 -- the thread must report why it died
            logger.exception("the engine thread stopped")
            self._dead = exc
            error = EngineDeadError(f"the engine stopped: {type(exc).__name__}: {exc}")
            self.died.set()
            self._fail_all(error)
            while True:  # requests that were on their way in
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if command[0] == "add":
                    self._send([(command[1], error)])
        finally:
            self._publish_snapshot()

    def _handle(self, command: tuple) -> bool:
        kind = command[0]
        if kind == "add":
            _, stream, prompt, params, priority = command
            try:
                self.engine.add_request(stream.request_id, prompt, params, priority=priority)
            except Exception as exc:  # noqa: BLE001 -- delivered to the request's handler (a 400)
                self._send([(stream, exc)])
            else:
                self._streams[stream.request_id] = stream
        elif kind == "abort":
            self._abort(command[1], RequestAborted("the client disconnected"))
        elif kind == "abort_all":
            for request_id in list(self._streams):
                self._abort(request_id, RequestAborted("the server is shutting down"))
        elif kind == "check_workers":
            self.engine.executor.check_workers()  # raises WorkerProcessError: the engine thread stops
        elif kind == "stop":
            for request_id in list(self._streams):
                self._abort(request_id, RequestAborted("the server is shutting down"))
            return False
        return True

    def _abort(self, request_id: str, reason: RequestAborted) -> None:
        self.engine.abort_request(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            if self.metrics is not None:
                self.metrics.finished("abort")
            self._send([(stream, reason)])

    def _step(self) -> None:
        self._step_started = time.monotonic()
        try:
            outputs = self.engine.step()
        except WorkerProcessError:
            raise  # a worker process is gone: no later step can run, so the engine thread stops
        except Exception as exc:  # noqa: BLE001 -- fail the requests in this batch, keep serving others later
            logger.exception("engine step failed; aborting the %d requests in flight", len(self._streams))
            error = RuntimeError(f"the engine failed: {type(exc).__name__}: {exc}")
            for request_id in list(self._streams):
                self.engine.abort_request(request_id)
                self._send([(self._streams.pop(request_id), error)])
            return
        finally:
            self._step_started = None
        now = time.monotonic()
        batch = []
        for request_id, error in self.engine.take_failures().items():  # ours, one request each: a 500 / error frame
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                if self.metrics is not None:
                    self.metrics.finished("error")
                batch.append((stream, error))
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            self._observe(stream, out, now)
            if out.finished:
                del self._streams[out.request_id]
            batch.append((stream, out))
        self._send(batch)
        self._publish_snapshot()

    def _observe(self, stream: _Stream, out: RequestOutput, now: float) -> None:
        if self.metrics is None:
            return
        num_tokens = stream.num_tokens + sum(len(c.token_ids) for c in out.outputs)  # out is a delta
        if num_tokens > stream.num_tokens:
            if stream.first_token is None:
                stream.first_token = now
                self.metrics.ttft.observe(now - stream.arrival)
            else:
                self.metrics.itl.observe(now - stream.last_token)
            stream.last_token = now
            stream.num_tokens = num_tokens
        if out.finished:
            self.metrics.e2e.observe(now - stream.arrival)
            for choice in out.outputs:
                self.metrics.finished(choice.finish_reason)

    def _send(self, items: list) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in items:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, group in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, group)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = list(self._streams.values()), {}
        self._send([(s, error) for s in streams])

    def _publish_snapshot(self) -> None:
        self._snapshot = self._make_snapshot()

    def _make_snapshot(self) -> dict:
        e = self.engine
        bm, sched, stats = e.block_manager, e.scheduler, e.stats
        return {"time": time.monotonic(), "running": len(sched.running), "waiting": len(sched.waiting),
                "kv_usage": bm.usage(), "blocks_used": bm.num_blocks - bm.num_free_blocks,
                "blocks_total": bm.num_blocks, "prefix_queries": bm.prefix_queries, "prefix_hits": bm.prefix_hits,
                "prompt_tokens": stats.prompt_tokens, "generation_tokens": stats.generation_tokens,
                "preemptions": sched.num_preemptions, "num_steps": stats.num_steps,
                "batch_sizes": dict(stats.batch_sizes), "max_batch_size": stats.max_batch_size,
                "finished_requests": stats.finished_requests, "in_flight": len(self._streams)}


def _deliver(group: list) -> None:
    for stream, item in group:
        stream.put(item)
