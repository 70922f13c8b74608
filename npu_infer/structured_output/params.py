"""StructuredOutputsParams: what the output must follow (vLLM's names; exactly one constraint per request)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

BACKENDS = ("auto", "xgrammar", "guidance")
_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# Free whitespace between JSON tokens is capped per gap: a small model sampled at temperature 0.8 can otherwise
# emit newlines until max_tokens and return JSON cut short (vLLM's open problem). 20 covers a newline and
# indentation 18 deep, so pretty-printed answers still fit.
JSON_MAX_WHITESPACE = 20


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None          # a JSON schema (object or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None              # EBNF (GBNF), as xgrammar and llama.cpp write it
    json_object: bool | None = None         # any JSON object
    structural_tag: str | dict | None = None
    disable_any_whitespace: bool = False    # JSON without free whitespace between tokens
    backend: str | None = None              # per request: auto | xgrammar | guidance

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured outputs take exactly one of json, regex, choice, grammar, json_object, "
                             f"structural_tag; got {', '.join(given) if given else 'none'}")
        if self.choice is not None and (not self.choice or any(not isinstance(c, str) for c in self.choice)):
            raise ValueError("structured output choice must be a non-empty list of strings")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"unknown structured outputs backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the JSON schema is not valid JSON: {exc}") from exc
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError("the JSON schema must be a JSON object")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str, bool]:
        """What identifies the compiled grammar (the cache key)."""
        value: Any = getattr(self, self.kind)
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return self.kind, text, self.disable_any_whitespace
