"""Hermes / Qwen2.5 tool calls: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, after any text."""
from __future__ import annotations

import json
import re

from npu_infer.api.tool_parsers.parsed import ParsedCall, call_from_object, partial_suffix

_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class HermesParser:
    start = "<tool_call>"

    def content_end(self, text: str) -> int:
        """How much of a growing text is surely content (streamed as it comes): up to the first call."""
        index = text.find(self.start)
        return index if index >= 0 else len(text) - partial_suffix(text, self.start)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content before the calls or None, the calls); text with no well-formed call is all content."""
        start = text.find(self.start)
        if start < 0:
            return text, []
        calls = []
        for body in _CALL.findall(text[start:]):
            try:
                call = call_from_object(json.loads(body))
            except json.JSONDecodeError:
                call = None
            if call is not None:
                calls.append(call)
        if not calls:
            return text, []
        content = text[:start].strip()
        return content or None, calls
