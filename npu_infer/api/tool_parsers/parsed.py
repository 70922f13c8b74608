"""What a tool-call parser returns, and reading JSON objects one after another from model text."""
from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def call_from_object(obj: object, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall | None:
    """{"name": ..., "arguments"|"parameters": {...}} -> a call; anything else -> None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in arguments_keys if k in obj), {})
    return ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def json_objects(text: str, separators: str = " \n\t;,") -> tuple[list[object], int]:
    """Decode JSON values one after another (skipping separators); returns them and where decoding stopped."""
    decoder = json.JSONDecoder()
    values, pos = [], 0
    while True:
        while pos < len(text) and text[pos] in separators:
            pos += 1
        if pos >= len(text):
            return values, pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return values, pos
        values.append(value)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag` (held back while streaming)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
