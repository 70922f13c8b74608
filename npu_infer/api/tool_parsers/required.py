"""The calls of tool_choice "required": the JSON array [{"name": ..., "parameters": {...}}, ...] that the grammar
forces (vLLM's form); not a --tool-call-parser, read by the same machinery."""
from npu_infer.api.tool_parsers.call_stream import CallFormat

REQUIRED = CallFormat(lead=("[",), between=(",", "]"))
