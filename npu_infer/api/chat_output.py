"""What a chat choice's text becomes: reasoning_content (--reasoning-parser), content, and tool_calls (forced by a
grammar for tool_choice "required" / a named function, parsed by --tool-call-parser for "auto"); whole, or as
OpenAI-framed stream deltas."""
from __future__ import annotations

from dataclasses import dataclass, field

from npu_infer.api.errors import bad_request
from npu_infer.api.protocol import (ChatCompletionRequest, ChatResponseMessage, DeltaFunctionCall, DeltaMessage,
                                    DeltaToolCall, FunctionCall, NamedToolChoice, ToolCall, random_id)
from npu_infer.api.tool_parsers import CallFormat, CallPiece, CallStream, ParsedCall, get_tool_parser
from npu_infer.api.tool_parsers.required import REQUIRED
from npu_infer.reasoning import ReasoningParser, get_reasoning_parser
from npu_infer.reasoning.stream import ReasoningStream

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    mode: str = "none"                  # none | auto | required | named
    name: str | None = None             # the named function
    parser: CallFormat | None = None    # the tool-call parser, for auto
    parallel: bool = True
    schema: dict | None = None          # the JSON schema that forces required / named calls

    def call_format(self) -> CallFormat | None:
        """The format the calls are read in: the --tool-call-parser's for auto, the forced array for required."""
        return self.parser if self.mode == "auto" else REQUIRED if self.mode == "required" else None

    def calls_from(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a finished answer; text that does not read as calls stays content."""
        if self.mode == "named":
            return None, [ParsedCall(self.name, text)]
        fmt = self.call_format()
        if fmt is None:
            return text, []
        content, calls = fmt.parse(text)
        return content, calls if self.parallel else calls[:1]


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
    """One streamed choice: takes each new piece of text and returns the delta to send (None: nothing yet). Each
    piece is read once: the reasoning split, then the tool calls, both incremental."""
    plan: ToolPlan
    reasoning: ReasoningParser | None
    include_reasoning: bool = True
    named_started: bool = False
    called: bool = False  # tool calls went out (auto / required): finish_reason "tool_calls"
    split: ReasoningStream | None = field(init=False)
    calls: CallStream | None = field(init=False)

    def __post_init__(self):
        self.split = ReasoningStream(self.reasoning) if self.reasoning is not None else None
        fmt = self.plan.call_format()
        self.calls = fmt.stream() if fmt is not None else None

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.called and reason == "stop" else reason

    def update(self, new_text: str, finished: bool) -> DeltaMessage | None:
        reasoning_text, content = self.split.feed(new_text, finished) if self.split else ("", new_text)
        delta = DeltaMessage()
        if reasoning_text and self.include_reasoning:
            delta.reasoning_content = reasoning_text
        self._route_content(content, finished, delta)
        return delta if delta.model_dump() else None

    def _route_content(self, content: str, finished: bool, delta: DeltaMessage) -> None:
        if self.plan.mode == "named":  # arguments stream as they come, under one call opened by the first chunk
            if not content and not (finished and not self.named_started):
                return
            call = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=content))
            if not self.named_started:
                call.id, call.type, call.function.name = random_id("chatcmpl-tool"), "function", self.plan.name
                self.named_started = True
            delta.tool_calls = [call]
            return
        if self.calls is None:
            delta.content = content or None
            return
        content, pieces = self.calls.feed(content, finished)
        delta.content = content or None
        tool_calls = _delta_tool_calls(pieces if self.plan.parallel else [p for p in pieces if p.index == 0])
        if tool_calls:
            self.called = True
            delta.tool_calls = tool_calls


def _delta_tool_calls(pieces: list[CallPiece]) -> list[DeltaToolCall]:
    """OpenAI's framing: a call opens with its id, type and name (and the arguments so far), then sends only more
    arguments; one entry per call in a delta."""
    calls: dict[int, DeltaToolCall] = {}
    for piece in pieces:
        call = calls.get(piece.index)
        if call is not None:
            call.function.arguments += piece.arguments
        elif piece.name is not None:
            calls[piece.index] = DeltaToolCall(index=piece.index, id=random_id("chatcmpl-tool"), type="function",
                                               function=DeltaFunctionCall(name=piece.name, arguments=piece.arguments))
        else:
            calls[piece.index] = DeltaToolCall(index=piece.index, function=DeltaFunctionCall(arguments=piece.arguments))
    return list(calls.values())


def reasoning_parser(name: str | None) -> ReasoningParser | None:
    return get_reasoning_parser(name) if name else None
