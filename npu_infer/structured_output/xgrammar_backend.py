"""The xgrammar backend (vLLM's default): compiles a constraint for the tokenizer; a matcher per sequence fills
its row of the token bitmask and follows the accepted tokens."""
from __future__ import annotations

import json

import torch
import xgrammar as xgr

from npu_infer.structured_output.params import JSON_MAX_WHITESPACE, StructuredOutputsParams


# JSON-schema keywords xgrammar compiles but does not enforce (it drops them, some with only a log line): a schema
# with one goes to llguidance under `auto`, and is refused under `xgrammar` (vLLM checks the same list).
_NOT_ENFORCED = ("multipleOf", "uniqueItems", "contains", "minContains", "maxContains", "minProperties",
                 "maxProperties", "propertyNames", "not", "if", "then", "else", "dependentRequired",
                 "dependentSchemas")


def unenforced_keyword(schema: object) -> str | None:
    """The first keyword of the schema (at any depth) that xgrammar would ignore."""
    if isinstance(schema, list):
        return next((k for k in map(unenforced_keyword, schema) if k), None)
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if key in _NOT_ENFORCED:
            return key
        if key in ("properties", "$defs", "definitions", "patternProperties"):  # names -> subschemas
            found = unenforced_keyword(list(value.values())) if isinstance(value, dict) else None
        elif key in ("enum", "const", "default", "examples", "required"):  # values, not schemas
            found = None
        else:
            found = unenforced_keyword(value)
        if found:
            return found
    return None


def choice_grammar(choices: list[str]) -> str:
    """EBNF that matches exactly one of the strings."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class XgrammarMatcher:
    def __init__(self, compiled: xgr.CompiledGrammar):
        self.matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class XgrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], fill_threads: int = 1):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._batch = xgr.BatchGrammarMatcher(max_threads=fill_threads)

    def fill_rows(self, matchers: list[XgrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Fill the bitmask rows of many matchers in one call (on `fill_threads` threads)."""
        self._batch.batch_fill_next_token_bitmask([m.matcher for m in matchers], bitmask, rows)

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """Raises RuntimeError (xgrammar's message) for a constraint it cannot compile."""
        kind = params.kind
        if kind == "json":
            keyword = unenforced_keyword(params.json)
            if keyword is not None:
                raise ValueError(f"xgrammar does not enforce the JSON-schema keyword {keyword!r}")
            return self._json(params.json, params)
        if kind == "json_object":
            return self._json({"type": "object"}, params)
        if kind == "regex":
            return self._compiler.compile_regex(params.regex)
        if kind == "choice":
            return self._compiler.compile_grammar(choice_grammar(params.choice))
        if kind == "grammar":
            return self._compiler.compile_grammar(params.grammar)
        tag = params.structural_tag
        tag = json.loads(tag) if isinstance(tag, str) else tag
        if "structures" in tag:  # vLLM's first format: {"structures": [{begin, schema, end}], "triggers": [...]}
            items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema") or {}), end=s["end"])
                     for s in tag["structures"]]
            return self._compiler.compile_structural_tag(items, tag["triggers"])
        return self._compiler.compile_structural_tag(json.dumps(tag))

    def _json(self, schema: dict, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        return self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=not params.disable_any_whitespace,
                                                  max_whitespace_cnt=JSON_MAX_WHITESPACE)

    def matcher(self, compiled: xgr.CompiledGrammar) -> XgrammarMatcher:
        return XgrammarMatcher(compiled)
