"""POST /v1/chat/completions: messages through the chat template -> assistant messages, whole or streamed."""
from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from npu_infer.api.async_engine import RequestAborted
from npu_infer.api.template_sandbox import TemplateError
from npu_infer.api.chat_output import ChoiceStream, ToolPlan, final_message, reasoning_parser, tool_plan
from npu_infer.api.errors import APIError, bad_request
from npu_infer.api.protocol import (ChatCompletionRequest, ChatCompletionResponse, ChatCompletionResponseChoice,
                                    ChatCompletionResponseStreamChoice, ChatCompletionStreamResponse, ChatMessage,
                                    DeltaMessage, UsageInfo, random_id)
from npu_infer.api.serving import (SSE_DONE, ChoiceCursor, ClientGone, ServingContext, chat_logprobs,
                                   collect_until_disconnect, json_response, prompt_logprobs_json, sse,
                                   stream_failure, watch_disconnect)
from npu_infer.outputs import add_delta


_RESERVED_KWARGS = {"conversation", "tokenize", "chat_template", "return_dict", "return_tensors", "tokenizer_kwargs"}


def render_chat(ctx: ServingContext, messages: list[ChatMessage], add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template: str | None = None,
                template_kwargs: dict | None = None, tools: list[dict] | None = None,
                documents: list[dict] | None = None, add_special_tokens: bool = False) -> list[int]:
    """The conversation as prompt token ids: the template renders the text, which already holds any BOS.
    Blocking (templates, tokenizing): handlers run it on a worker thread."""
    tokenizer = ctx.need_tokenizer("chat")
    try:
        conversation = [m.as_template_input() for m in messages]
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from exc
    # chat_template_kwargs may set the template's own switches (add_generation_prompt too), not ours.
    kwargs = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
              **{k: v for k, v in (template_kwargs or {}).items() if k not in _RESERVED_KWARGS}}
    if chat_template is not None:
        extra = {k: v for k, v in (("tools", tools), ("documents", documents)) if v is not None}
        text = _render_request_template(ctx, tokenizer, chat_template, conversation, {**kwargs, **extra})
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, tools=tools, documents=documents,
                                             **kwargs)
    except ValueError as exc:  # no template, bad content parts
        raise bad_request(f"cannot apply the chat template: {exc}; start the server with --chat-template "
                          "if the model has none", "messages") from exc
    except Exception as exc:  # noqa: BLE001 -- jinja errors: the template refuses these messages
        raise bad_request(f"the chat template refused these messages: {type(exc).__name__}: {exc}",
                          "messages") from exc
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _template_kwargs(req: ChatCompletionRequest) -> dict:
    kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:  # templates that take it (gpt-oss) read it, as in vLLM
        kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    return kwargs


def _echo_prefix(req: ChatCompletionRequest) -> str:
    """vLLM's chat echo: the last message's text when it is the assistant's own (continued) message."""
    last = req.messages[-1]
    if not req.echo or last.role != "assistant" or req.add_generation_prompt:
        return ""
    content = last.as_template_input()["content"]
    return content if isinstance(content, str) else ""


def _render_request_template(ctx: ServingContext, tokenizer, template: str, conversation: list[dict],
                             kwargs: dict) -> str:
    """A template from the request is a program from the network: refused unless the server trusts request
    templates, and then rendered in the sandbox's child process with a time and size limit (vLLM's
    CVE-2025-61620 was a request template that froze the server)."""
    if ctx.template_sandbox is None:
        raise bad_request("a chat_template in the request is refused; leave it out, or start the server with "
                          "--trust-request-chat-template", "chat_template")
    variables = {**{k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
                 **kwargs, "messages": conversation}
    try:
        text = ctx.template_sandbox.render(template, variables)
    except TemplateError as exc:
        raise bad_request(str(exc), "chat_template") from exc
    if kwargs.get("continue_final_message") and conversation:
        final = conversation[-1]["content"]
        if final not in text:
            raise bad_request("continue_final_message: the template does not render the final message as given",
                              "messages")
        text = text[:text.rindex(final) + len(final)]  # as transformers does: cut what follows the final message
    return text


async def create_chat_completion(req: ChatCompletionRequest, raw: Request, ctx: ServingContext) -> Response:
    ctx.check_request(req)
    plan = tool_plan(req, ctx.enable_auto_tool_choice, ctx.tool_call_parser)
    model = ctx.model_name(req.model)
    ctx.check_sequences(req.n)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    prompt_ids = await asyncio.to_thread(render_chat, ctx, req.messages, req.add_generation_prompt,
                                         req.continue_final_message, req.chat_template, _template_kwargs(req),
                                         tools, req.documents, bool(req.add_special_tokens))
    max_tokens = req.max_completion_tokens or req.max_tokens or ctx.default_max_tokens(len(prompt_ids))
    top_n = req.top_logprobs or 0
    prompt_logprobs = req.prompt_logprobs
    if prompt_logprobs is None and req.echo and req.logprobs:
        prompt_logprobs = top_n
    try:
        params = req.sampling_params(max_tokens, top_n if req.logprobs else None, prompt_logprobs,
                                     defaults=ctx.sampling_defaults)
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    params.structured_outputs = req.structured_outputs_params(plan.schema)
    ctx.validate(prompt_ids, params, "messages")
    request_id = ctx.request_id(req, raw, "chatcmpl")
    created = int(time.time())
    start = time.monotonic()
    ctx.log_received(request_id, None, prompt_ids, params)
    stream = ctx.engine.generate(request_id, {"prompt_token_ids": prompt_ids, "cache_salt": req.cache_salt},
                                 params, req.priority)

    def abort():
        ctx.engine.abort(request_id)

    if req.stream:
        return StreamingResponse(_stream(req, raw, ctx, model, request_id, created, params, stream, abort, start, plan),
                                 media_type="text/event-stream", headers={"X-Request-Id": request_id})
    try:
        (final,) = await collect_until_disconnect(raw, [stream], abort)
    except ClientGone:
        ctx.log_finished(request_id, len(prompt_ids), None, start, None, "aborted: the client disconnected")
        return Response(status_code=499)
    except RequestAborted as exc:
        raise APIError(503, f"the request was aborted: {exc}") from exc
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    echo = _echo_prefix(req)
    as_ids = bool(req.return_tokens_as_token_ids)
    reasoning = reasoning_parser(ctx.reasoning_parser)
    choices = []
    for out in final.outputs:
        message, finish_reason = final_message(out.text, out.finish_reason, plan, reasoning, req.include_reasoning)
        if echo:
            message.content = echo + (message.content or "")
        choices.append(ChatCompletionResponseChoice(
            index=out.index, message=message,
            logprobs=chat_logprobs(ctx, out.token_ids, out.logprobs, top_n, as_ids) if req.logprobs else None,
            finish_reason=finish_reason, stop_reason=out.stop_reason,
            token_ids=list(out.token_ids) if ctx.send_token_ids(req) else None))
    completion_tokens = sum(len(o.token_ids) for o in final.outputs)
    prompt_tokens = len(final.prompt_token_ids)  # after truncate_prompt_tokens
    ctx.log_finished(request_id, len(prompt_ids), final.outputs, start, final.metrics.get("first_token_time"))
    response = ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                      usage=ctx.usage(prompt_tokens, completion_tokens, final.num_cached_tokens),
                                      prompt_logprobs=prompt_logprobs_json(final.prompt_logprobs)
                                      if req.prompt_logprobs is not None else None)
    return await json_response(response, {"X-Request-Id": request_id})


async def _stream(req: ChatCompletionRequest, raw: Request, ctx: ServingContext, model: str, request_id: str,
                  created: int, params, stream, abort, start: float, plan: ToolPlan):
    watcher = asyncio.ensure_future(watch_disconnect(raw, abort))
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    continuous = req.stream_options is not None and req.stream_options.continuous_usage_stats
    top_n = req.top_logprobs or 0
    cursors = [ChoiceCursor() for _ in range(params.n)]
    reasoning = reasoning_parser(ctx.reasoning_parser)
    states = [ChoiceStream(plan, reasoning, req.include_reasoning) for _ in range(params.n)]
    prompt_tokens = completion_tokens = cached_tokens = 0
    first_token = None
    finished = False

    def chunk(choices, usage=None):
        return ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)

    def usage():
        return ctx.usage(prompt_tokens, completion_tokens, cached_tokens)

    try:
        # The role comes first, in a chunk of its own, as OpenAI sends it.
        yield sse(chunk([ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                                      content=_echo_prefix(req)))
                         for i in range(params.n)]))
        total = None  # the deltas so far, for the log line
        async for out in stream:
            total = add_delta(total, out)
            prompt_tokens, cached_tokens = len(out.prompt_token_ids), out.num_cached_tokens
            completion_tokens = sum(len(c.token_ids) for c in total.outputs)
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
                logprobs = chat_logprobs(ctx, new_ids, new_entries or [], top_n,
                                         bool(req.return_tokens_as_token_ids)) if req.logprobs else None
                state = states[choice.index]
                delta = state.update(new_text, choice.finish_reason is not None)
                if delta is None and choice.finish_reason is None and not (logprobs or ctx.send_token_ids(req)):
                    continue  # text held back (a tool call or tag still arriving)
                choices.append(ChatCompletionResponseStreamChoice(
                    index=choice.index, delta=delta or DeltaMessage(), logprobs=logprobs,
                    finish_reason=state.finish_reason(choice.finish_reason), stop_reason=choice.stop_reason,
                    token_ids=list(new_ids) if ctx.send_token_ids(req) else None))
            finished = out.finished
            if choices:
                yield sse(chunk(choices, usage() if continuous else None))
            if finished:
                ctx.log_finished(request_id, prompt_tokens, total.outputs, start, first_token)
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
