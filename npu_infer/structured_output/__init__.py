"""Structured outputs (vLLM's): JSON schema, regex, choice, EBNF grammar and structural tags, enforced by a token
bitmask from xgrammar (llguidance as the fallback for what xgrammar refuses)."""
from npu_infer.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
