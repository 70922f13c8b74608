"""Hermes / Qwen2.5 tool calls: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, after any text."""
from npu_infer.api.tool_parsers.call_stream import CallFormat

HERMES = CallFormat(opener="<tool_call>", between=("</tool_call>",), content_first=True)
