"""What a chat choice's text becomes: reasoning_content (--reasoning-parser), content, and tool_calls (forced by a
grammar for tool_choice "required" / a named function, parsed by --tool-call-parser for "auto"); whole, or as
OpenAI-framed stream deltas."""
from __future__ import annotations

import json
from dataclasses import dataclass

from npu_infer.api.errors import bad_request
from npu_infer.api.protocol import (ChatCompletionRequest, ChatResponseMessage, DeltaFunctionCall, DeltaMessage,
                                    DeltaToolCall, FunctionCall, NamedToolChoice, ToolCall, random_id)
from npu_infer.api.tool_parsers import ParsedCall, get_tool_parser
from npu_infer.api.tool_parsers.parsed import partial_suffix
from npu_infer.reasoning import ReasoningParser, get_reasoning_parser

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    mode: str = "none"                  # none | auto | required | named
    name: str | None = None             # the named function
    parser: object | None = None        # the tool-call parser, for auto
    parallel: bool = True
    schema: dict | None = None          # the JSON schema that forces required / named calls

    def calls_from(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a finished answer; content stays whole when the calls cannot be read."""
        if self.mode == "named":
            return None, [ParsedCall(self.name, text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                return text, []  # cut short (max_tokens): the text as it is
            calls = [ParsedCall(i["name"], json.dumps(i.get("parameters", {}), ensure_ascii=False)) for i in items]
            return None, calls
        if self.mode == "auto":
            content, calls = self.parser.parse(text)
            return content, calls if self.parallel else calls[:1]
        return text, []


def tool_plan(req: ChatCompletionRequest, enable_auto: bool, parser_name: str | None) -> ToolPlan:
    """How this request's tools are used; 400 for a choice the request or the server cannot honour."""
    choice = req.effective_tool_choice
    tools = {t.function.name: t.function for t in req.tools or []}
    parallel = req.parallel_tool_calls is not False
    if choice == "none":
        return ToolPlan()
    if not tools:
        raise bad_request(f"tool_choice {_choice_name(choice)} needs tools", "tool_choice")
    if isinstance(choice, NamedToolChoice):
        function = tools.get(choice.function.name)
        if function is None:
            raise bad_request(f"tool_choice names the function {choice.function.name!r}, which is not in tools",
                              "tool_choice")
        return ToolPlan("named", function.name, parallel=parallel, schema=function.parameters or EMPTY_PARAMETERS)
    if choice == "required":
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"type": "string", "enum": [f.name]},
                                              "parameters": f.parameters or EMPTY_PARAMETERS},
             "required": ["name", "parameters"]} for f in tools.values()]}}
        if not parallel:
            schema["maxItems"] = 1
        return ToolPlan("required", parallel=parallel, schema=schema)
    if not enable_auto or parser_name is None:
        raise bad_request('"auto" tool choice needs the server started with --enable-auto-tool-choice and '
                          "--tool-call-parser", "tool_choice")
    return ToolPlan("auto", parser=get_tool_parser(parser_name), parallel=parallel)


def _choice_name(choice) -> str:
    return repr(choice) if isinstance(choice, str) else repr(choice.function.name)


def _tool_calls(calls: list[ParsedCall]) -> list[ToolCall]:
    return [ToolCall(function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def final_message(text: str, finish_reason: str | None, plan: ToolPlan, reasoning: ReasoningParser | None,
                  include_reasoning: bool = True) -> tuple[ChatResponseMessage, str | None]:
    """The assistant message of a finished choice, and its finish_reason ("tool_calls" when the model called)."""
    reasoning_text, content = reasoning.split(text) if reasoning is not None else (None, text)
    content, calls = plan.calls_from(content or "") if plan.mode != "none" and content else (content, [])
    message = ChatResponseMessage(content=content, reasoning_content=reasoning_text if include_reasoning else None,
                                  tool_calls=_tool_calls(calls))
    if calls and plan.mode in ("auto", "required") and finish_reason == "stop":
        finish_reason = "tool_calls"  # OpenAI keeps "stop" when a named function was forced
    return message, finish_reason


@dataclass
class ChoiceStream:
    """One streamed choice: takes each new piece of text and returns the delta to send (None: nothing yet)."""
    plan: ToolPlan
    reasoning: ReasoningParser | None
    include_reasoning: bool = True
    text: str = ""
    reasoning_sent: int = 0
    content_sent: int = 0
    named_started: bool = False
    calls_sent: bool = False
    called: bool = False  # tool calls went out (auto / required): finish_reason "tool_calls"

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.called and reason == "stop" else reason

    def update(self, new_text: str, finished: bool) -> DeltaMessage | None:
        self.text += new_text
        text = self.text
        if self.reasoning is not None:
            if not finished:  # a tag may be arriving: hold its start back
                text = text[:len(text) - partial_suffix(text, self.reasoning.end)]
                if self.reasoning.start.startswith(text.lstrip()):
                    text = ""
            reasoning_text, content = self.reasoning.split(text)
        else:
            reasoning_text, content = None, text
        reasoning_text, content = reasoning_text or "", content or ""
        delta = DeltaMessage()
        if reasoning_text[self.reasoning_sent:] and self.include_reasoning:
            delta.reasoning_content = reasoning_text[self.reasoning_sent:]
        self.reasoning_sent = max(self.reasoning_sent, len(reasoning_text))
        self._route_content(content, finished, delta)
        return delta if delta.model_dump() else None

    def _route_content(self, content: str, finished: bool, delta: DeltaMessage) -> None:
        mode = self.plan.mode
        if mode == "named":  # arguments stream as they come, under one call opened by the first chunk
            new = content[self.content_sent:]
            self.content_sent = len(content)
            if not new and not (finished and not self.named_started):
                return
            call = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=new))
            if not self.named_started:
                call.id, call.type, call.function.name = random_id("chatcmpl-tool"), "function", self.plan.name
                self.named_started = True
            delta.tool_calls = [call]
            return
        calls: list[ParsedCall] = []
        if finished and mode in ("required", "auto") and not self.calls_sent:
            self.calls_sent = True
            _, calls = self.plan.calls_from(content)
        sure = len(content)  # plain chat; or a finished answer with no call after all: the held text is content
        if mode == "required" and (calls or not finished):
            sure = 0
        elif mode == "auto" and (calls or not finished):
            sure = self.plan.parser.content_end(content)
        if sure > self.content_sent:
            delta.content = content[self.content_sent:sure]
            self.content_sent = sure
        if calls:
            self.called = True
            delta.tool_calls = [DeltaToolCall(index=i, id=c.id, type="function",
                                              function=DeltaFunctionCall(name=c.function.name,
                                                                         arguments=c.function.arguments))
                                for i, c in enumerate(_tool_calls(calls))]


def reasoning_parser(name: str | None) -> ReasoningParser | None:
    return get_reasoning_parser(name) if name else None
