"""Tool-call parsers (--tool-call-parser, vLLM's names): read the calls a model wrote in its own format."""
from npu_infer.api.tool_parsers.call_stream import CallFormat, CallStream
from npu_infer.api.tool_parsers.hermes import HERMES
from npu_infer.api.tool_parsers.llama3_json import LLAMA3_JSON
from npu_infer.api.tool_parsers.parsed import CallPiece, ParsedCall

TOOL_PARSERS = {"hermes": HERMES, "llama3_json": LLAMA3_JSON}


def get_tool_parser(name: str) -> CallFormat:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]


__all__ = ["TOOL_PARSERS", "CallFormat", "CallPiece", "CallStream", "ParsedCall", "get_tool_parser"]
