"""One tool call's JSON object, {"name": "...", "arguments": {...}}, read a character at a time as the model writes it:
the name once it is whole, and the arguments' text as it forms (the model's own text, so every piece is final)."""
from __future__ import annotations

import json

WHITESPACE = " \t\n\r"
_CLOSE = {"{": "}", "[": "]"}


class CallObject:
    """Reads the object after its "{" (the caller consumed it). Keys may come in any order; other keys are skipped.
    state: key | in_key | colon | value | in_value | next | done | bad."""

    def __init__(self, arguments_keys: tuple[str, ...]):
        self.arguments_keys = arguments_keys
        self.state = "key"
        self.key: str | None = None
        self.raw: list[str] = []       # the key, or a string / scalar value, being read
        self.kind = ""                 # of the value being read: '"' string, "{" object or array, "x" other
        self.stack = ""                # open brackets of an object / array value
        self.in_string = self.escaped = False
        self.name: str | None = None
        self.named = False             # the name is whole and the object well formed past it: the call is real
        self.in_arguments = False      # the value being read is the arguments
        self.has_arguments = False
        self.pending: list[str] = []   # arguments text read, not yet taken

    def read(self, text: str, pos: int) -> int:
        """Reads text from pos until the object closes ("done"), breaks ("bad", pos at the bad character) or the text
        ends; returns where it stopped."""
        while pos < len(text) and self.state not in ("done", "bad"):
            if self._char(text[pos]):
                pos += 1
        return pos

    def take(self) -> str:
        """The arguments text read since the last take; nothing until the call is known to be real."""
        if not self.named:
            return ""
        piece = "".join(self.pending)
        self.pending.clear()
        return piece

    def _char(self, ch: str) -> bool:
        """Advance by one character; False when ch must be read again in the new state (it ended a scalar)."""
        state = self.state
        if state == "in_value":
            return self._value_char(ch)
        if state == "in_key":
            if self._string_char(ch):
                self.key = self._decode()
                self.state = "colon" if isinstance(self.key, str) else "bad"
            return True
        if ch in WHITESPACE:
            return True
        if state == "key":
            if ch == "}":  # an empty object, or a trailing comma
                self._close()
            else:
                self.state, self.raw = ("in_key", [ch]) if ch == '"' else ("bad", [])
        elif state == "colon":
            self.state = "value" if ch == ":" else "bad"
        elif state == "value":
            self._start_value(ch)
        elif state == "next":
            if ch == ",":
                self.named = self.name is not None  # the name is followed by what JSON allows: the call is real
                self.state = "key"
            elif ch == "}":
                self._close()
            else:
                self.state = "bad"
        return True

    def _close(self) -> None:
        self.state = "done"
        self.named = self.name is not None
        if self.named and not self.has_arguments:
            self.pending.append("{}")  # no arguments written: none taken

    def _start_value(self, ch: str) -> None:
        if ch in "}],:":
            self.state = "bad"
            return
        self.state = "in_value"
        self.in_arguments = self.key in self.arguments_keys and not self.has_arguments
        self.kind = ch if ch in '"{[' else "x"
        if self.kind == "[":
            self.kind = "{"
        self.raw = [ch] if self.kind != "{" else []
        if self.kind == "{":
            self.stack = ch
            if self.in_arguments:
                self.pending.append(ch)

    def _value_char(self, ch: str) -> bool:
        if self.kind == '"':
            if self._string_char(ch):
                self._end_value()
            return True
        if self.kind == "x":
            if ch in WHITESPACE or ch in ",}":
                self._end_value()
                return False
            self.raw.append(ch)
            return True
        # An object or array: only the brackets outside strings matter; an arguments value goes out as it comes.
        if self.in_arguments:
            self.pending.append(ch)
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.stack += ch
        elif ch in "}]":
            if _CLOSE[self.stack[-1]] != ch:
                self.state = "bad"
                return True
            self.stack = self.stack[:-1]
            if not self.stack:
                self._end_value()
        return True

    def _string_char(self, ch: str) -> bool:
        """Adds ch to the string in self.raw; True when it closed the string."""
        self.raw.append(ch)
        if self.escaped:
            self.escaped = False
        elif ch == "\\":
            self.escaped = True
        elif ch == '"':
            return True
        return False

    def _decode(self) -> object:
        try:
            return json.loads("".join(self.raw))
        except json.JSONDecodeError:
            return None

    def _end_value(self) -> None:
        self.state = "next"
        if self.key == "name" and self.name is None:
            name = self._decode() if self.kind == '"' else None
            if not isinstance(name, str):
                self.state = "bad"  # not a call
            self.name = name
        elif self.in_arguments:
            self.has_arguments = True
            if self.kind == '"':  # arguments written as a JSON string: that string is the arguments text
                value = self._decode()
                if not isinstance(value, str):
                    self.state = "bad"
                    return
                self.pending.append(value)
            elif self.kind == "x":
                self.pending.append("".join(self.raw))
        self.raw = []
        self.in_arguments = False
