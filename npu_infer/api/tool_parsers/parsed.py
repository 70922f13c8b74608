"""What a tool-call parser returns, whole (ParsedCall) or streamed (CallPiece)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it: the model's own text of the arguments


@dataclass
class CallPiece:
    """A piece of the index-th call of a choice: its first piece has the name, later ones only more arguments."""
    index: int
    name: str | None
    arguments: str

