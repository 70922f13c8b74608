"""Incremental detokenization (tokenizers' DecodeStream, O(1) per token) and stop-string matching."""
from __future__ import annotations

from tokenizers.decoders import DecodeStream

_PROMPT_CONTEXT = 5  # prompt tokens fed first, so the first output token decodes with its leading space right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        self.backend = backend
        if backend is not None:
            self.stream = DecodeStream(ids=prompt_ids[-_PROMPT_CONTEXT:], skip_special_tokens=skip_special_tokens)
        else:  # a slow tokenizer: decode the whole output each time
            self.ids: list[int] = []
            self.text = ""

    def step(self, token_id: int) -> str:
        """The text this token adds (may be '' while a multi-byte character is incomplete)."""
        if self.backend is not None:
            return self.stream.step(self.backend, token_id) or ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta


def find_stop(text: str, new_len: int, stops: list[str]) -> tuple[str, int] | None:
    """The first stop string that appears in the last new_len characters (plus overlap); its index."""
    best = None
    for stop in stops:
        start = max(0, len(text) - new_len - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[1]):
            best = (stop, index)
    return best
