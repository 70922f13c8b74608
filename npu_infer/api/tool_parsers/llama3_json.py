"""Llama 3.x JSON tool calls: [<|python_tag|>]{"name": ..., "parameters": {...}}, several joined by "; "; a Llama 3
call is the whole message, so an answer that does not start as one is all content."""
from npu_infer.api.tool_parsers.call_stream import CallFormat

PYTHON_TAG = "<|python_tag|>"

LLAMA3_JSON = CallFormat(lead=(PYTHON_TAG,), between=(";", ","))
