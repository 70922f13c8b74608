"""Tool-call parsers (--tool-call-parser, vLLM's names): read the calls a model wrote in its own format."""
from npu_infer.api.tool_parsers.hermes import HermesParser
from npu_infer.api.tool_parsers.llama3_json import Llama3JsonParser
from npu_infer.api.tool_parsers.parsed import ParsedCall

TOOL_PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}


def get_tool_parser(name: str):
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


__all__ = ["TOOL_PARSERS", "ParsedCall", "get_tool_parser"]
