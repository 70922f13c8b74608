"""POST /v1/chat/completions: messages through the chat template -> assistant messages, whole or streamed."""
from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from npu_infer.api.async_engine import RequestAborted
from npu_infer.api.errors import APIError, bad_request
from npu_infer.api.protocol import (ChatCompletionRequest, ChatCompletionResponse, ChatCompletionResponseChoice,
                                    ChatCompletionResponseStreamChoice, ChatCompletionStreamResponse, ChatMessage,
                                    ChatResponseMessage, DeltaMessage, random_id)
from npu_infer.api.serving import (SSE_DONE, ChoiceCursor, ClientGone, ServingContext, chat_logprobs,
                                   collect_until_disconnect, sse, stop_holdback, stream_failure,
                                   watch_disconnect)


_RESERVED_KWARGS = {"conversation", "tokenize", "chat_template", "return_dict", "return_tensors", "tokenizer_kwargs"}


def render_chat(ctx: ServingContext, messages: list[ChatMessage], add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template: str | None = None,
                template_kwargs: dict | None = None) -> list[int]:
    """The conversation as prompt token ids: the template renders the text, which already holds any BOS."""
    tokenizer = ctx.need_tokenizer("chat")
    try:
        conversation = [m.as_template_input() for m in messages]
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from exc
    try:
        # chat_template_kwargs may set the template's own switches (add_generation_prompt too), not ours.
        kwargs = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
                  **{k: v for k, v in (template_kwargs or {}).items() if k not in _RESERVED_KWARGS}}
        text = tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=chat_template, **kwargs)
    except ValueError as exc:  # no template, bad content parts
        raise bad_request(f"cannot apply the chat template: {exc}; start the server with --chat-template "
                          "if the model has none", "messages") from exc
    except Exception as exc:  # noqa: BLE001 -- jinja errors: the template refuses these messages
        raise bad_request(f"the chat template refused these messages: {type(exc).__name__}: {exc}",
                          "messages") from exc
    return tokenizer.encode(text, add_special_tokens=False)


async def create_chat_completion(req: ChatCompletionRequest, raw: Request, ctx: ServingContext) -> Response:
    model = ctx.model_name(req.model)
    prompt_ids = render_chat(ctx, req.messages, req.add_generation_prompt, req.continue_final_message,
                             req.chat_template, req.chat_template_kwargs)
    max_tokens = req.max_completion_tokens or req.max_tokens or ctx.default_max_tokens(len(prompt_ids))
    top_n = req.top_logprobs or 0
    try:
        params = req.sampling_params(max_tokens, top_n if req.logprobs else None, defaults=ctx.sampling_defaults)
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    ctx.validate(prompt_ids, params, "messages")
    request_id = random_id("chatcmpl")
    created = int(time.time())
    start = time.monotonic()
    ctx.log_received(request_id, None, prompt_ids, params)
    stream = ctx.engine.generate(request_id, {"prompt_token_ids": prompt_ids}, params)

    def abort():
        ctx.engine.abort(request_id)

    if req.stream:
        return StreamingResponse(_stream(req, raw, ctx, model, request_id, created, params, stream, abort, start),
                                 media_type="text/event-stream")
    try:
        (final,) = await collect_until_disconnect(raw, [stream], abort)
    except ClientGone:
        ctx.log_finished(request_id, len(prompt_ids), None, start, None, "aborted: the client disconnected")
        return Response(status_code=499)
    except RequestAborted as exc:
        raise APIError(503, f"the request was aborted: {exc}") from exc
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    choices = [ChatCompletionResponseChoice(
        index=out.index, message=ChatResponseMessage(role="assistant", content=out.text),
        logprobs=chat_logprobs(ctx, out.token_ids, out.logprobs, top_n) if req.logprobs else None,
        finish_reason=out.finish_reason, stop_reason=out.stop_reason,
        token_ids=list(out.token_ids) if ctx.send_token_ids(req) else None) for out in final.outputs]
    completion_tokens = sum(len(o.token_ids) for o in final.outputs)
    ctx.log_finished(request_id, len(prompt_ids), final.outputs, start, final.metrics.get("first_token_time"))
    response = ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                      usage=ctx.usage(len(prompt_ids), completion_tokens, final.num_cached_tokens))
    return JSONResponse(response.model_dump(mode="json"))


async def _stream(req: ChatCompletionRequest, raw: Request, ctx: ServingContext, model: str, request_id: str,
                  created: int, params, stream, abort, start: float):
    watcher = asyncio.ensure_future(watch_disconnect(raw, abort))
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    continuous = req.stream_options is not None and req.stream_options.continuous_usage_stats
    top_n = req.top_logprobs or 0
    cursors = [ChoiceCursor(holdback=stop_holdback(params)) for _ in range(params.n)]
    prompt_tokens = completion_tokens = cached_tokens = 0
    first_token = None
    finished = False

    def chunk(choices, usage=None):
        return ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)

    def usage():
        return ctx.usage(prompt_tokens, completion_tokens, cached_tokens)

    try:
        # The role comes first, in a chunk of its own, as OpenAI sends it.
        yield sse(chunk([ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                         for i in range(params.n)]))
        async for out in stream:
            prompt_tokens, cached_tokens = len(out.prompt_token_ids), out.num_cached_tokens
            completion_tokens = sum(len(c.token_ids) for c in out.outputs)
            if first_token is None and completion_tokens:
                first_token = time.monotonic()
            choices = []
            for choice in out.outputs:
                cursor = cursors[choice.index]
                if cursor.finished:
                    continue
                new_text, new_ids, new_entries = cursor.delta(choice)
                if not new_text and not new_ids and choice.finish_reason is None:
                    continue
                logprobs = chat_logprobs(ctx, new_ids, new_entries or [], top_n) if req.logprobs else None
                choices.append(ChatCompletionResponseStreamChoice(
                    index=choice.index, delta=DeltaMessage(content=new_text), logprobs=logprobs,
                    finish_reason=choice.finish_reason, stop_reason=choice.stop_reason,
                    token_ids=list(new_ids) if ctx.send_token_ids(req) else None))
            finished = out.finished
            if choices:
                yield sse(chunk(choices, usage() if continuous else None))
            if finished:
                ctx.log_finished(request_id, prompt_tokens, out.outputs, start, first_token)
        if include_usage:
            yield sse(chunk([], usage()))
        yield SSE_DONE
    except Exception as exc:  # noqa: BLE001 -- the status line is already sent; report in the stream
        if isinstance(exc, RequestAborted):
            ctx.log_finished(request_id, prompt_tokens, None, start, first_token, f"aborted: {exc}")
        for event in stream_failure(exc):
            yield event
    finally:
        watcher.cancel()
        if not finished:
            abort()
