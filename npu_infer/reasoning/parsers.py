"""<think>...</think> splitting for DeepSeek-R1 and Qwen3, whole and streamed (vLLM's deepseek_r1 and qwen3)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    starts_in_reasoning: bool   # deepseek_r1: the template opens <think>, so output is reasoning until </think>
    start: str = "<think>"
    end: str = "</think>"

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a whole output; None for a part that is absent."""
        body = text.lstrip()
        opened = body.startswith(self.start)
        if opened:
            body = body[len(self.start):]
        else:
            body = text
        if self.end in body:
            reasoning, _, content = body.partition(self.end)
            return reasoning, content or None
        if opened or self.starts_in_reasoning:
            return body, None  # still thinking (cut by max_tokens, or a stream in progress)
        return None, text


PARSERS = {"deepseek_r1": ReasoningParser("deepseek_r1", starts_in_reasoning=True),
           "qwen3": ReasoningParser("qwen3", starts_in_reasoning=False)}


def get_reasoning_parser(name: str) -> ReasoningParser:
    if name not in PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(PARSERS)}")
    return PARSERS[name]
