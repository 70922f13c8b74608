"""POST /v1/completions: prompts (text, texts, token ids, lists of token ids) -> choices, whole or streamed."""
from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from npu_infer.api.async_engine import RequestAborted
from npu_infer.api.errors import APIError, bad_request
from npu_infer.api.protocol import (CompletionRequest, CompletionResponse, CompletionResponseChoice,
                                    CompletionResponseStreamChoice, CompletionStreamResponse, UsageInfo)
from npu_infer.api.serving import (SSE_DONE, ChoiceCursor, ClientGone, ServingContext, collect_until_disconnect,
                                   completion_logprobs, json_response, merge, prompt_logprobs_json, sse,
                                   stream_failure, watch_disconnect)
from npu_infer.outputs import RequestOutput, add_delta
from npu_infer.sampling import SamplingParams


def _prompts(ctx: ServingContext, prompt, add_special_tokens: bool = True) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) for each prompt of the request."""
    if isinstance(prompt, str):
        return [(prompt, ctx.encode(prompt, add_special_tokens))]
    if prompt and isinstance(prompt[0], int):
        return [(None, list(prompt))]
    if prompt and isinstance(prompt[0], str):
        return [(p, ctx.encode(p, add_special_tokens)) for p in prompt]
    return [(None, list(p)) for p in prompt]


def _params(req: CompletionRequest, ctx: ServingContext, prompt_ids: list[int]) -> SamplingParams:
    # OpenAI's default of 16 holds unless the model's generation config gives one (or the request sends null).
    omitted = "max_tokens" not in req.model_fields_set and "max_tokens" in ctx.sampling_defaults
    max_tokens = ctx.default_max_tokens(len(prompt_ids)) if omitted or req.max_tokens is None else req.max_tokens
    logprobs = req.logprobs
    n = req.n
    if req.best_of is not None and req.best_of > req.n:
        n = req.best_of
        logprobs = logprobs if logprobs is not None else 0  # cumulative logprobs rank the candidates
    prompt_logprobs = req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        prompt_logprobs = max(prompt_logprobs or 0, req.logprobs)
    try:
        params = req.sampling_params(max_tokens, logprobs, prompt_logprobs, n=n, defaults=ctx.sampling_defaults)
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    params.structured_outputs = req.structured_outputs_params()
    return params


async def create_completion(req: CompletionRequest, raw: Request, ctx: ServingContext) -> Response:
    ctx.check_request(req)
    model = ctx.model_name(req.model)
    prompts = await asyncio.to_thread(_prompts, ctx, req.prompt, req.add_special_tokens is not False)
    ctx.check_sequences(len(prompts) * max(req.n, req.best_of or 1))
    params_list = []
    for i, (_, ids) in enumerate(prompts):
        params = _params(req, ctx, ids)
        ctx.validate(ids, params, "prompt")
        params_list.append(params)
    if req.echo and any(text is None for text, _ in prompts) and ctx.tokenizer is None:
        raise bad_request("echo of token-id prompts needs a tokenizer")
    request_id = ctx.request_id(req, raw, "cmpl")
    created = int(time.time())
    sub_ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
    start = time.monotonic()
    for sub_id, (text, ids), params in zip(sub_ids, prompts, params_list):
        ctx.log_received(sub_id, text, ids, params)

    def streams():
        return [ctx.engine.generate(sub_id, {"prompt": text, "prompt_token_ids": ids, "cache_salt": req.cache_salt},
                                    params, req.priority)
                for sub_id, (text, ids), params in zip(sub_ids, prompts, params_list)]

    def abort_all():
        for sub_id in sub_ids:
            ctx.engine.abort(sub_id)

    if req.stream:
        return StreamingResponse(_stream(req, raw, ctx, model, request_id, created, prompts, params_list,
                                         streams(), abort_all, start), media_type="text/event-stream",
                                 headers={"X-Request-Id": request_id})
    try:
        finals = await collect_until_disconnect(raw, streams(), abort_all)
    except ClientGone:
        ctx.log_finished(request_id, 0, None, start, None, "aborted: the client disconnected")
        return Response(status_code=499)
    except RequestAborted as exc:
        raise APIError(503, f"the request was aborted: {exc}") from exc
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    return await json_response(_response(req, ctx, model, request_id, created, prompts, finals, start),
                               {"X-Request-Id": request_id})


def _echo_text(ctx: ServingContext, prompt: tuple[str | None, list[int]]) -> str:
    text, ids = prompt
    return text if text is not None else ctx.decode(ids)


def _response(req: CompletionRequest, ctx: ServingContext, model: str, request_id: str, created: int,
              prompts: list, finals: list[RequestOutput], start: float) -> CompletionResponse:
    choices = []
    prompt_tokens = completion_tokens = cached_tokens = 0
    for i, (prompt, final) in enumerate(zip(prompts, finals)):
        prompt_tokens += len(final.prompt_token_ids)
        cached_tokens += final.num_cached_tokens
        completion_tokens += sum(len(o.token_ids) for o in final.outputs)
        outputs = final.outputs
        if req.best_of is not None and req.best_of > req.n:
            outputs = sorted(outputs, key=lambda o: o.cumulative_logprob or 0.0, reverse=True)[:req.n]
        for j, out in enumerate(outputs):
            text, token_ids, entries = out.text, out.token_ids, out.logprobs
            prefix = ""
            if req.echo:
                prefix = _echo_text(ctx, prompt)
                text = prefix + text
            logprobs = None
            if req.logprobs is not None:
                if req.echo:
                    token_ids = final.prompt_token_ids + token_ids
                    entries = list(final.prompt_logprobs or [None] * len(final.prompt_token_ids)) + entries
                logprobs = completion_logprobs(ctx, token_ids, entries, as_ids=bool(req.return_tokens_as_token_ids))
            choices.append(CompletionResponseChoice(
                index=i * req.n + j, text=text, logprobs=logprobs, finish_reason=out.finish_reason,
                stop_reason=out.stop_reason, token_ids=list(out.token_ids) if ctx.send_token_ids(req) else None,
                prompt_logprobs=prompt_logprobs_json(final.prompt_logprobs) if req.prompt_logprobs is not None
                else None))
        ctx.log_finished(final.request_id, len(final.prompt_token_ids), final.outputs, start,
                         final.metrics.get("first_token_time"))
    return CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                              usage=ctx.usage(prompt_tokens, completion_tokens, cached_tokens))


async def _stream(req: CompletionRequest, raw: Request, ctx: ServingContext, model: str, request_id: str,
                  created: int, prompts: list, params_list: list[SamplingParams], streams: list, abort_all,
                  start: float):
    watcher = asyncio.ensure_future(watch_disconnect(raw, abort_all))
    cursors = {}
    prompt_tokens = [len(ids) for _, ids in prompts]
    completion_tokens: dict[tuple[int, int], int] = {}
    cached_tokens: dict[int, int] = {}
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    continuous = req.stream_options is not None and req.stream_options.continuous_usage_stats
    totals: dict[int, RequestOutput] = {}  # each prompt's deltas so far, for the log line
    finals: dict[int, RequestOutput] = {}
    first_token = None
    try:
        async for i, out in merge(streams):
            cached_tokens[i] = out.num_cached_tokens
            chunk_choices = []
            for choice in out.outputs:
                key = (i, choice.index)
                cursor = cursors.get(key)
                if cursor is None:
                    cursor = cursors[key] = ChoiceCursor()
                if cursor.finished:
                    continue
                new_text, new_ids, new_entries = cursor.delta(choice)
                completion_tokens[key] = completion_tokens.get(key, 0) + len(new_ids)
                prefix_ids: list[int] = []
                prefix_entries: list = []
                if req.echo and not cursor.started:
                    echo = _echo_text(ctx, prompts[i])
                    new_text = echo + new_text
                    prefix_ids = list(out.prompt_token_ids)
                    prefix_entries = list(out.prompt_logprobs or [None] * len(prefix_ids))
                cursor.started = True
                if not new_text and not new_ids and choice.finish_reason is None:
                    continue
                logprobs = None
                if req.logprobs is not None:
                    logprobs = completion_logprobs(ctx, prefix_ids + new_ids, prefix_entries + (new_entries or []),
                                                   cursor.text_offset, bool(req.return_tokens_as_token_ids))
                    cursor.text_offset += sum(len(t) for t in logprobs.tokens)
                chunk_choices.append(CompletionResponseStreamChoice(
                    index=i * req.n + choice.index, text=new_text, logprobs=logprobs,
                    finish_reason=choice.finish_reason, stop_reason=choice.stop_reason,
                    token_ids=list(new_ids) if ctx.send_token_ids(req) else None))
            if first_token is None and any(c.token_ids for c in out.outputs):
                first_token = time.monotonic()
            totals[i] = add_delta(totals.get(i), out)
            if out.finished:
                finals[i] = totals[i]
            if not chunk_choices:
                continue
            chunk = CompletionStreamResponse(id=request_id, created=created, model=model, choices=chunk_choices)
            if continuous:
                chunk.usage = _usage(ctx, prompt_tokens, completion_tokens, cached_tokens)
            yield sse(chunk)
        if include_usage:
            yield sse(CompletionStreamResponse(id=request_id, created=created, model=model, choices=[],
                                               usage=_usage(ctx, prompt_tokens, completion_tokens, cached_tokens)))
        yield SSE_DONE
        for final in finals.values():
            ctx.log_finished(final.request_id, len(final.prompt_token_ids), final.outputs, start, first_token)
    except Exception as exc:  # noqa: BLE001 -- the status line is already sent; report in the stream
        if isinstance(exc, RequestAborted):
            ctx.log_finished(request_id, sum(prompt_tokens), None, start, first_token, f"aborted: {exc}")
        for event in stream_failure(exc):
            yield event
    finally:
        watcher.cancel()
        if len(finals) < len(prompts):  # left early (disconnect, error): free the engine's blocks now
            abort_all()


def _usage(ctx: ServingContext, prompt_tokens: list[int], completion_tokens: dict, cached_tokens: dict) -> UsageInfo:
    return ctx.usage(sum(prompt_tokens), sum(completion_tokens.values()), sum(cached_tokens.values()))
