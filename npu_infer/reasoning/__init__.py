"""Reasoning parsers (--reasoning-parser, vLLM's names): split a model's <think>...</think> from its answer."""
from npu_infer.reasoning.parsers import PARSERS, ReasoningParser, get_reasoning_parser

__all__ = ["PARSERS", "ReasoningParser", "get_reasoning_parser", "reasoning_token_ids"]


def reasoning_token_ids(name: str, tokenizer) -> tuple[int | None, int] | None:
    """The (start, end) token ids of the parser's tags in this tokenizer; None when the end tag is not one token
    (structured output then starts at once)."""
    parser = get_reasoning_parser(name)
    vocab = tokenizer.get_vocab()
    end = vocab.get(parser.end)
    return (vocab.get(parser.start), end) if end is not None else None
