"""The llguidance backend: the fallback for schemas xgrammar refuses (vLLM's `auto`), same bitmask layout."""
from __future__ import annotations

import json

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from npu_infer.structured_output.params import JSON_MAX_WHITESPACE, StructuredOutputsParams
from npu_infer.structured_output.xgrammar_backend import choice_grammar


class GuidanceMatcher:
    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str):
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)

    def accept(self, token: int) -> bool:
        return self._matcher.consume_token(token)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_stopped()


class GuidanceBackend:
    name = "guidance"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                       eos_token=stop_token_ids or None)

    def compile(self, params: StructuredOutputsParams) -> str:
        """The grammar in llguidance's JSON form; raises ValueError with llguidance's message when invalid."""
        kind = params.kind
        if kind == "structural_tag":
            raise ValueError("structural_tag needs the xgrammar backend")
        if kind in ("json", "json_object"):
            schema = dict(params.json) if kind == "json" else {"type": "object"}
            schema.setdefault("x-guidance", {"whitespace_flexible": not params.disable_any_whitespace,
                                             "whitespace_pattern": None if params.disable_any_whitespace
                                             else rf"[\x20\x0A\x0D\x09]{{0,{JSON_MAX_WHITESPACE}}}"})
            grammar = llguidance.grammar_from("json_schema", json.dumps(schema))
        elif kind == "choice":
            grammar = llguidance.grammar_from("grammar", choice_grammar(params.choice))
        else:
            grammar = llguidance.grammar_from(kind, getattr(params, kind))
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise ValueError("; ".join(messages) if isinstance(messages, list) else str(messages))
        return grammar

    def matcher(self, compiled: str) -> GuidanceMatcher:
        return GuidanceMatcher(self._tokenizer, compiled)
