"""A reasoning split as the text grows: each piece of text is read once (the held back part aside), and once the
answer is past </think> it goes straight through as content."""
from __future__ import annotations

from npu_infer.reasoning.parsers import ReasoningParser


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag` (held back while streaming)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """feed() returns the (reasoning, content) text that became final; a tag cut across pieces is held back.
    phase: start (the text may still open with <think>) | reasoning | content."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.text = ""     # the text not yet given out
        self.phase = "start"

    def feed(self, new_text: str, finished: bool) -> tuple[str, str]:
        if self.phase == "content":
            return "", new_text
        self.text += new_text
        p = self.parser
        if self.phase == "start":
            body = self.text.lstrip()
            if not finished and p.start.startswith(body):
                return "", ""  # <think> may be arriving
            if body.startswith(p.start):
                self.text = body[len(p.start):]
            elif not p.starts_in_reasoning:
                self.phase, text, self.text = "content", self.text, ""
                return "", text
            self.phase = "reasoning"
        end = self.text.find(p.end)
        if end >= 0:
            self.phase, text, self.text = "content", self.text, ""
            return text[:end], text[end + len(p.end):]
        stop = len(self.text) - (0 if finished else partial_suffix(self.text, p.end))
        reasoning, self.text = self.text[:stop], self.text[stop:]
        return reasoning, ""
