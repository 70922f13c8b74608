"""Llama 3.x JSON tool calls: [<|python_tag|>]{"name": ..., "parameters": {...}}, several joined by "; "."""
from __future__ import annotations

from npu_infer.api.tool_parsers.parsed import ParsedCall, call_from_object, json_objects

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser:
    def content_end(self, text: str) -> int:
        """How much of a growing text is surely content: a Llama 3 tool call is the whole message, starting with
        the python tag or "{", so nothing is sure until the first characters say which."""
        stripped = text.lstrip()
        if not stripped or stripped.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(stripped):
            return 0
        return len(text)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.lstrip()
        if not body.startswith(("{", PYTHON_TAG)):
            return text, []
        body = body.removeprefix(PYTHON_TAG)
        values, end = json_objects(body)
        calls = [c for c in (call_from_object(v) for v in values) if c is not None]
        if not calls or len(calls) != len(values) or body[end:].strip():
            return text, []  # not (only) tool calls: the model answered in text
        return None, calls
