"""Tool calls read out of a growing model text in one model's format: what is surely content, and each call's name
and arguments text, go out as soon as they are final. The non-streamed message is the same reading of the whole
text at once, so streamed and non-streamed answers agree by construction."""
from __future__ import annotations

from dataclasses import dataclass

from npu_infer.api.tool_parsers.call_object import WHITESPACE, CallObject
from npu_infer.api.tool_parsers.parsed import CallPiece, ParsedCall
from npu_infer.reasoning.stream import partial_suffix


@dataclass(frozen=True)
class CallFormat:
    opener: str = ""                # written before each call's "{" (hermes: "<tool_call>")
    lead: tuple[str, ...] = ()      # may come before the first call (the python tag, the "[" of an array)
    between: tuple[str, ...] = ()   # may come between and after calls (separators, closing tags)
    content_first: bool = False     # text before the first call is content (hermes)
    arguments_keys: tuple[str, ...] = ("arguments", "parameters")

    def stream(self) -> CallStream:
        return CallStream(self)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content or None, calls) of a whole text; text with no call in it is all content."""
        content, pieces = self.stream().feed(text, True)
        calls: list[ParsedCall] = []
        for piece in pieces:
            if piece.name is not None:
                calls.append(ParsedCall(piece.name, piece.arguments))
            else:
                calls[piece.index].arguments += piece.arguments
        return content or None, calls


class CallStream:
    """One choice's text as it grows: feed() returns the content and call pieces that became final.

    Phases: lead (before the first call: content for hermes, else the allowed lead-in) -> open (after the opener)
    -> call (inside a call object) -> between (separators, closing tags) -> open or call again. A call counts once
    its name is read and followed by "," or "}"; from then on it is sent and never taken back: if the model breaks
    off (max_tokens, bad JSON), the call keeps the arguments written so far. Text that does not read as a call
    (before any call: the whole answer; after calls: from the end of the last one) is content, phase "text"."""

    def __init__(self, fmt: CallFormat):
        self.fmt = fmt
        self.text = ""          # the text still needed (what is read and settled is dropped)
        self.pos = 0            # read up to here
        self.sent = 0           # content sent up to here: the rest is content if no call comes
        self.tail = 0           # after the last call: the rest is content if no further call comes
        self.phase = "lead"
        self.reader: CallObject | None = None
        self.calls = 0          # calls sent

    def feed(self, new_text: str, finished: bool) -> tuple[str, list[CallPiece]]:
        self.text += new_text
        content, pieces = "", []
        while True:
            if self.phase == "text":
                content += self.text[self.sent:]
                self.sent = len(self.text)
                break
            if self.phase == "lead" and self.fmt.content_first:
                content += self._content_before_calls(finished)
                if self.phase == "lead":
                    break
                continue
            if self.phase == "call":
                if self._read_call(finished, pieces):
                    continue
                break
            lit = self._literal(finished)
            if lit is None or (lit == "" and finished and self.phase != "between"):
                self._not_a_call()
            elif lit == "":
                break  # more text needed (or, between calls at the end, nothing left)
        self._trim()
        return content, pieces

    def _content_before_calls(self, finished: bool) -> str:
        """Content up to the first opener; whitespace and a partial opener at its end are held back."""
        opener = self.fmt.opener
        at = self.text.find(opener, self.pos)
        if at < 0 and finished:
            self.phase = "text"
            return ""
        end = at if at >= 0 else len(self.text) - partial_suffix(self.text, opener)
        sure = self.text[self.sent:end].rstrip()  # the whitespace before a call is not content
        self.sent += len(sure)
        self.pos = end
        if at >= 0:
            self.pos, self.phase = at + len(opener), "open"
        return sure

    def _read_call(self, finished: bool, pieces: list[CallPiece]) -> bool:
        """Reads on in the current call; True when the phase changed (read on), False when more text is needed."""
        reader = self.reader
        was_named = reader.named
        self.pos = reader.read(self.text, self.pos)
        if reader.named:
            arguments = reader.take()
            if not was_named:
                pieces.append(CallPiece(self.calls, reader.name, arguments))
                self.calls += 1
            elif arguments:
                pieces.append(CallPiece(self.calls - 1, None, arguments))
        if reader.state == "done" and reader.named:
            self.phase, self.tail = "between", self.pos
        elif reader.state == "bad" and reader.named:
            self.phase, self.sent = "text", self.pos  # broken after the call went out: the rest is content
        elif reader.state in ("done", "bad") or (finished and not reader.named):
            self._not_a_call()
        else:
            return False  # more text needed, or cut by the end: the call keeps what it has
        return True

    def _literal(self, finished: bool) -> str | None:
        """Steps over the next expected literal; "" when more text is needed, None when the text is not one."""
        start = "{" if self.phase == "open" or not self.fmt.opener else self.fmt.opener
        extra = self.fmt.lead if self.phase == "lead" else self.fmt.between if self.phase == "between" else ()
        options = (start, *WHITESPACE, *extra)
        rest = self.text[self.pos:self.pos + max(map(len, options))]
        lit = next((o for o in options if rest.startswith(o)), None) if rest else ""
        if lit is None and not finished and any(o.startswith(rest) for o in options):
            lit = ""  # a literal cut by the end of the text so far
        if not lit:
            return lit
        self.pos += len(lit)
        if lit == start:
            if start == "{":
                self.phase, self.reader = "call", CallObject(self.fmt.arguments_keys)
            else:
                self.phase = "open"
        elif lit.strip() and self.phase == "between":
            self.tail = self.pos
        return lit

    def _not_a_call(self) -> None:
        """What was taken for a call is not one: it and all after it are content."""
        if self.calls:
            self.sent = self.tail
        self.phase = "text"

    def _trim(self) -> None:
        """Drops the text no longer needed, so that a long answer costs linear time."""
        if self.phase == "text":
            keep = self.sent
        elif self.phase == "call" and self.reader.named:
            keep = self.pos
        else:
            keep = min(self.pos, self.sent if not self.calls else self.tail)
        if keep:
            self.text = self.text[keep:]
            self.pos, self.sent, self.tail = self.pos - keep, max(self.sent - keep, 0), max(self.tail - keep, 0)
