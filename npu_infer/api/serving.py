"""What the completions and chat handlers share: the model-name check, prompt validation, running engine
requests until the client goes away, streaming deltas from cumulative snapshots, SSE framing, logprobs."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from npu_infer.api.async_engine import AsyncEngine, RequestAborted
from npu_infer.api.errors import APIError, bad_request, error_body
from npu_infer.api.limits import ServerLimits
from npu_infer.api.protocol import (ChatCompletionLogProbs, ChatLogProb, ChatLogProbsContent, CompletionLogProbs,
                                    UsageInfo, random_id)
from npu_infer.api.template_sandbox import TemplateSandbox
from npu_infer.outputs import CompletionOutput, Logprob, RequestOutput, add_delta
from npu_infer.sampling import SamplingParams

logger = logging.getLogger("npu_infer.api")
_MIN_LOGPROB = -9999.0  # JSON has no -inf


@dataclass
class ServingContext:
    engine: AsyncEngine
    model_names: list[str]
    log_requests: bool = True
    max_log_len: int | None = None        # most prompt characters / token ids a log line shows
    prompt_tokens_details: bool = False   # usage.prompt_tokens_details.cached_tokens (--enable-prompt-tokens-details)
    enable_auto_tool_choice: bool = False   # --enable-auto-tool-choice
    tool_call_parser: str | None = None     # --tool-call-parser
    reasoning_parser: str | None = None     # --reasoning-parser
    limits: ServerLimits = field(default_factory=ServerLimits)
    template_sandbox: TemplateSandbox | None = None  # set when request chat templates are trusted

    def check_sequences(self, num_sequences: int) -> None:
        """Prompts x max(n, best_of): what one request may start."""
        cap = self.limits.max_sequences_per_request
        if num_sequences > cap:
            raise bad_request(f"this request would start {num_sequences} sequences (prompts x n or best_of); "
                              f"the server's limit is {cap} (--max-sequences-per-request)", "n")

    @property
    def llm(self):
        return self.engine.engine

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.llm.config.max_model_len

    @property
    def sampling_defaults(self) -> dict:
        """The model's generation-config defaults for the sampling fields a request leaves out (--generation-config)."""
        return self.llm.sampling_defaults

    def default_max_tokens(self, prompt_len: int) -> int:
        """max_tokens when the request gives none: the generation config's, else all the room left (vLLM's)."""
        room = max(self.max_model_len - prompt_len, 1)
        return min(self.sampling_defaults.get("max_tokens") or room, room)

    def model_name(self, requested: str | None) -> str:
        """The name to report; 404 when the request names a model this server does not serve."""
        if requested is None or requested == "":
            return self.model_names[0]
        if requested not in self.model_names:
            served = ", ".join(repr(n) for n in self.model_names)
            raise APIError(404, f"the model {requested!r} does not exist; this server serves {served}",
                           param="model", code="model_not_found")
        return requested

    def request_id(self, req, raw: Request, prefix: str) -> str:
        """The client's request_id (body, else the X-Request-Id header) under OpenAI's prefix, else a random one."""
        given = req.request_id or raw.headers.get("x-request-id")
        return f"{prefix}-{given}" if given else random_id(prefix)

    def check_request(self, req) -> None:
        """400 for any field this server would otherwise drop, and for a priority it cannot honour."""
        req.refuse_unsupported()
        if req.priority and self.llm.config.scheduling_policy != "priority":
            raise bad_request(f"priority {req.priority} needs the server started with --scheduling-policy "
                              "priority; leave it at 0", "priority")

    def send_token_ids(self, request) -> bool:
        """Token ids go out when asked for, and always without a tokenizer (there is no text then)."""
        return request.return_token_ids or self.tokenizer is None

    def need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise bad_request(f"{what} needs a tokenizer, and this server runs with --skip-tokenizer-init; "
                              "send token ids instead")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.need_tokenizer("a text prompt").encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def validate(self, prompt_ids: list[int], params: SamplingParams, param: str = "prompt") -> None:
        """The engine's own checks (lengths, token ids), run here so a bad request is a 400 before it queues."""
        try:
            self.llm.validate(prompt_ids, params)
        except ValueError as exc:
            raise bad_request(str(exc), param) from exc

    def log_received(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                     params: SamplingParams) -> None:
        """vLLM's request log line: the prompt and its token ids (cut at --max-log-len) and the sampling params."""
        if not self.log_requests:
            return
        cut = self.max_log_len
        logger.info("received request %s: prompt: %r, prompt_token_ids: %s, params: %s", request_id,
                    prompt if prompt is None or cut is None else prompt[:cut],
                    prompt_ids if cut is None else prompt_ids[:cut], params)

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> UsageInfo:
        details = {"cached_tokens": cached_tokens} if self.prompt_tokens_details else None
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)

    def log_finished(self, request_id: str, prompt_tokens: int, outputs: list[CompletionOutput] | None,
                     start: float, first_token: float | None, status: str = "ok") -> None:
        if not self.log_requests:
            return
        if outputs is None:
            logger.info("request %s %s after %.2f s", request_id, status, time.monotonic() - start)
            return
        reasons = ",".join(sorted({str(o.finish_reason) for o in outputs}))
        ttft = f"{first_token - start:.3f} s" if first_token else "-"
        logger.info("request %s: %d prompt + %d output tokens, finish %s, ttft %s, total %.3f s", request_id,
                    prompt_tokens, sum(len(o.token_ids) for o in outputs), reasons, ttft, time.monotonic() - start)


async def json_response(response: BaseModel, headers: dict[str, str] | None = None) -> JSONResponse:
    """Encoded on a worker thread: a response with many choices and logprobs takes a while to serialize."""
    return await asyncio.to_thread(lambda: JSONResponse(response.model_dump(mode="json"), headers=headers))


# ---- running requests ---------------------------------------------------------------------------------------
async def watch_disconnect(raw: Request, on_disconnect: Callable[[], None]) -> None:
    """Wait for the client to go away (the body has been read, so receive() only reports the disconnect)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def collect_until_disconnect(raw: Request, streams: list[AsyncIterator[RequestOutput]],
                                   on_disconnect: Callable[[], None]) -> list[RequestOutput]:
    """Run every stream to its final snapshot; a disconnect cancels them all (their generators abort)."""
    async def last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
        final = None
        async for out in stream:
            final = add_delta(final, out)
        return final

    work = asyncio.ensure_future(asyncio.gather(*(last(s) for s in streams)))
    watcher = asyncio.ensure_future(watch_disconnect(raw, on_disconnect))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        try:
            await work
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 -- the client is gone; nothing to report
            pass
        raise ClientGone()
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, snapshot) from several request streams as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue(maxsize=2 * len(streams))  # bounded: a slow reader holds the pumps
    done = object()

    async def pump(i: int, stream):
        try:
            async for out in stream:
                await queue.put((i, out))
        except BaseException as exc:  # noqa: BLE001 -- handed to the consumer
            await queue.put((i, exc))
            return
        await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


# ---- streaming deltas ---------------------------------------------------------------------------------------
@dataclass
class ChoiceCursor:
    """Where one streamed choice stands. The engine hands out deltas (text a stop string may still cut is held
    back there), so each output's text and tokens are exactly what to send."""
    text_offset: int = 0
    finished: bool = False
    started: bool = False

    def delta(self, choice: CompletionOutput) -> tuple[str, list[int], list | None]:
        """New text, new token ids and their logprob dicts of this delta."""
        if choice.finish_reason is not None:
            self.finished = True
        return choice.text, choice.token_ids, choice.logprobs


def sse(payload) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json()
    return f"data: {data}\n\n"


def sse_error(status: int, message: str) -> str:
    return f"data: {json.dumps(error_body(status, message))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def stream_failure(exc: Exception) -> tuple[str, str]:
    """The events that end a stream failing after its 200 was sent: the error as OpenAI's JSON, then [DONE]."""
    if isinstance(exc, RequestAborted):
        return sse_error(503, f"the request was aborted: {exc}"), SSE_DONE
    if isinstance(exc, ValueError):
        return sse_error(400, str(exc)), SSE_DONE
    return sse_error(500, f"{type(exc).__name__}: {exc}"), SSE_DONE


# ---- logprobs -----------------------------------------------------------------------------------------------
def _clamp(value: float) -> float:
    return max(value, _MIN_LOGPROB)


def _token_text(ctx: ServingContext, token_id: int, lp: Logprob | None, as_ids: bool = False) -> str:
    if as_ids:
        return f"token_id:{token_id}"
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return ctx.decode([token_id]) if ctx.tokenizer is not None else f"token_id:{token_id}"


def completion_logprobs(ctx: ServingContext, token_ids: list[int], entries: list[dict[int, Logprob] | None],
                        initial_offset: int = 0, as_ids: bool = False) -> CompletionLogProbs:
    """OpenAI's legacy shape: tokens, token_logprobs, top_logprobs (chosen + top-k), text_offset."""
    out = CompletionLogProbs()
    offset = initial_offset
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id) if entry else None
        token = _token_text(ctx, token_id, chosen, as_ids)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_clamp(chosen.logprob))
        out.top_logprobs.append({_token_text(ctx, tid, lp, as_ids): _clamp(lp.logprob) for tid, lp in entry.items()})
    return out


def chat_logprobs(ctx: ServingContext, token_ids: list[int], entries: list[dict[int, Logprob]],
                  top_n: int, as_ids: bool = False) -> ChatCompletionLogProbs:
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        token = _token_text(ctx, token_id, chosen, as_ids)
        tops = sorted(((tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= top_n),
                      key=lambda item: item[1].rank)[:top_n]
        content.append(ChatLogProbsContent(
            token=token, logprob=_clamp(chosen.logprob), bytes=list(token.encode("utf-8")),
            top_logprobs=[ChatLogProb(token=(t := _token_text(ctx, tid, lp, as_ids)), logprob=_clamp(lp.logprob),
                                      bytes=list(t.encode("utf-8"))) for tid, lp in tops]))
    return ChatCompletionLogProbs(content=content)


def prompt_logprobs_json(entries: list[dict[int, Logprob] | None] | None) -> list | None:
    if entries is None:
        return None
    return [None if e is None else {tid: {"logprob": _clamp(lp.logprob), "rank": lp.rank,
                                          "decoded_token": lp.decoded_token} for tid, lp in e.items()}
            for e in entries]
