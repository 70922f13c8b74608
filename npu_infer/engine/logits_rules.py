"""Per-request logits rules and their batched form for one step.

A request may restrict its next token by a structured-output matcher, allowed_token_ids, bad_words, logit_bias
and min_tokens. Each rule is prepared once when the request arrives (token ids, a packed bitmask row); each step
gathers the sampled rows' rules into one packed bitmask array and one sparse (row, token, bias) list, which the
sampling rank applies to the logits on its device in two batched ops (worker/logits_masks.py)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from npu_infer.sampling import SamplingParams
from npu_infer.worker.step_io import LogitsMasks

logger = logging.getLogger(__name__)


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allowed_bitmask(token_ids: list[int], vocab_size: int) -> np.ndarray:
    """A packed int32 row with the bits of `token_ids` set (xgrammar's layout: token t is bit t % 32 of word t // 32)."""
    bits = np.zeros(bitmask_words(vocab_size) * 32, dtype=bool)
    bits[np.asarray(token_ids, dtype=np.int64)] = True
    return np.packbits(bits.reshape(-1, 8), axis=1, bitorder="little").reshape(-1).view(np.int32).copy()


@dataclass
class RequestLogitsRules:
    matcher: object | None = None          # structured output: fills its bitmask row, follows accepted tokens
    allowed: np.ndarray | None = None      # packed bitmask row of allowed_token_ids
    bias_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # logit_bias, 1-token bad words
    bias_values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    bad_sequences: list[list[int]] = field(default_factory=list)  # multi-token bad words
    min_tokens_ban: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # EOS + stop ids
    min_tokens: int = 0
    reasoning_end_id: int | None = None    # structured output starts after this token (the reasoning's end)
    in_reasoning: bool = False

    def grammar_active(self) -> bool:
        return self.matcher is not None and not self.in_reasoning

    def accept(self, token: int) -> bool:
        """Follow a sampled token; False when the grammar refuses it (the request cannot go on)."""
        if self.matcher is None:
            return True
        if self.in_reasoning:
            if token == self.reasoning_end_id:
                self.in_reasoning = False
            return True
        return self.matcher.accept(token)

    def grammar_finished(self) -> bool:
        return self.grammar_active() and self.matcher.is_terminated()


def make_rules(params: SamplingParams, prompt_ids: list[int], vocab_size: int, eos_ids: set[int], tokenizer,
               matcher=None, reasoning_ids: tuple[int, int] | None = None) -> RequestLogitsRules | None:
    """The request's rules, or None when it has none (the common case costs nothing per step).
    Raises ValueError for token ids outside the vocabulary."""
    rules = RequestLogitsRules(matcher=matcher)
    if params.allowed_token_ids is not None:
        _check_ids(params.allowed_token_ids, vocab_size, "allowed_token_ids")
        rules.allowed = allowed_bitmask(params.allowed_token_ids, vocab_size)
    biases: dict[int, float] = {}
    for token, value in (params.logit_bias or {}).items():
        _check_ids([token], vocab_size, "logit_bias")
        biases[token] = float(value)
    for word in params.bad_words or []:
        for sequence in _bad_word_sequences(tokenizer, word):
            if len(sequence) == 1:
                biases[sequence[0]] = float("-inf")
            else:
                rules.bad_sequences.append(sequence)
    if biases:
        rules.bias_tokens = np.fromiter(biases.keys(), np.int64, len(biases))
        rules.bias_values = np.fromiter(biases.values(), np.float32, len(biases))
    if params.min_tokens and not params.ignore_eos:
        banned = sorted(set(eos_ids) | set(params.stop_token_ids))
        rules.min_tokens_ban = np.asarray([t for t in banned if 0 <= t < vocab_size], np.int64)
        rules.min_tokens = params.min_tokens
    elif params.min_tokens:
        rules.min_tokens_ban = np.asarray([t for t in params.stop_token_ids if 0 <= t < vocab_size], np.int64)
        rules.min_tokens = params.min_tokens
    if matcher is not None and reasoning_ids is not None:
        start_id, end_id = reasoning_ids
        rules.reasoning_end_id = end_id
        # Still reasoning unless the prompt already closed it (a template that skips thinking writes the end).
        rules.in_reasoning = _last_index(prompt_ids, end_id) <= _last_index(prompt_ids, start_id)
    empty = (rules.matcher is None and rules.allowed is None and not len(rules.bias_tokens)
             and not rules.bad_sequences and not len(rules.min_tokens_ban))
    return None if empty else rules


def _check_ids(ids: list[int], vocab_size: int, name: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{name} holds token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


def _last_index(ids: list[int], token: int | None) -> int:
    if token is None:
        return -1
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token:
            return i
    return -1


def _bad_word_sequences(tokenizer, word: str) -> list[list[int]]:
    """The word's tokens as it starts a text and after a space, as vLLM bans them."""
    if tokenizer is None:
        raise ValueError("bad_words needs a tokenizer")
    sequences = []
    for text in (word, " " + word.lstrip()):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if ids and ids not in sequences:
            sequences.append(ids)
    return sequences


def gather_step_masks(rows: list[tuple[str, RequestLogitsRules, list[int]]], vocab_size: int,
                      fill_bitmask) -> LogitsMasks | None:
    """One step's masks for the sampled rows (request id, rules, output token ids so far); None when no row has
    a rule. `fill_bitmask(matchers) -> array` fills the structured-output rows in one call."""
    rows = [row for row in rows if row[1] is not None]
    if not rows:
        return None
    mask_ids, mask_rows, matcher_rows = [], [], []
    bias_ids: list[str] = []
    bias_tokens, bias_values = [], []
    for request_id, rules, output_ids in rows:
        if rules.grammar_active() or rules.allowed is not None:
            mask_ids.append(request_id)
            mask_rows.append(rules.allowed)
            matcher_rows.append(rules.matcher if rules.grammar_active() else None)
        tokens, values = _row_biases(rules, output_ids)
        if len(tokens):
            bias_ids.extend([request_id] * len(tokens))
            bias_tokens.append(tokens)
            bias_values.append(values)
    bitmask = None
    if mask_ids:
        bitmask = np.full((len(mask_ids), bitmask_words(vocab_size)), -1, dtype=np.int32)
        if any(m is not None for m in matcher_rows):
            bitmask = fill_bitmask(matcher_rows, bitmask)
        for i, allowed in enumerate(mask_rows):
            if allowed is not None:
                bitmask[i] &= allowed
    if not mask_ids and not bias_ids:
        return None
    return LogitsMasks(mask_ids, bitmask, bias_ids,
                       np.concatenate(bias_tokens) if bias_tokens else np.zeros(0, np.int64),
                       np.concatenate(bias_values) if bias_values else np.zeros(0, np.float32))


def _row_biases(rules: RequestLogitsRules, output_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    tokens, values = [rules.bias_tokens], [rules.bias_values]
    banned = [seq[-1] for seq in rules.bad_sequences
              if len(output_ids) >= len(seq) - 1 and output_ids[len(output_ids) - len(seq) + 1:] == seq[:-1]]
    if len(output_ids) < rules.min_tokens:
        banned.extend(rules.min_tokens_ban.tolist())
    if banned:
        tokens.append(np.asarray(banned, np.int64))
        values.append(np.full(len(banned), float("-inf"), np.float32))
    if len(tokens) == 1:
        return rules.bias_tokens, rules.bias_values
    return np.concatenate(tokens), np.concatenate(values)
