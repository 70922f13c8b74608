"""The reasoning parsers on recorded DeepSeek-R1 / Qwen3 outputs: whole, and streamed in small pieces with the
same split (a </think> cut across pieces is held back, never sent as reasoning)."""
from __future__ import annotations

import pytest

from npu_infer.api.chat_output import ChoiceStream, ToolPlan
from npu_infer.reasoning import get_reasoning_parser, reasoning_token_ids

R1 = "Okay, the user wants 2+2. That is 4.\n</think>\n\nThe answer is **4**."
R1_CUT = "Okay, let me think about this step by step. First"  # max_tokens hit while thinking
QWEN3 = "<think>\nThe user greets me. I should greet back.\n</think>\n\nHello! How can I help you today?"
QWEN3_NO_THINK = "Hello! How can I help you today?"


@pytest.mark.parametrize("name,text,reasoning,content", [
    ("deepseek_r1", R1, "Okay, the user wants 2+2. That is 4.\n", "\n\nThe answer is **4**."),
    ("deepseek_r1", "<think>" + R1, "Okay, the user wants 2+2. That is 4.\n", "\n\nThe answer is **4**."),
    ("deepseek_r1", R1_CUT, R1_CUT, None),
    ("qwen3", QWEN3, "\nThe user greets me. I should greet back.\n", "\n\nHello! How can I help you today?"),
    ("qwen3", QWEN3_NO_THINK, None, QWEN3_NO_THINK),
])
def test_split(name, text, reasoning, content):
    assert get_reasoning_parser(name).split(text) == (reasoning, content)


@pytest.mark.parametrize("name,text", [("deepseek_r1", R1), ("qwen3", QWEN3), ("qwen3", QWEN3_NO_THINK)])
@pytest.mark.parametrize("piece", [1, 3, 7])
def test_stream_reassembles_to_the_split(name, text, piece):
    parser = get_reasoning_parser(name)
    state = ChoiceStream(ToolPlan(), parser)
    reasoning = content = ""
    for i in range(0, len(text), piece):
        delta = state.update(text[i:i + piece], i + piece >= len(text))
        if delta is not None:
            reasoning += delta.reasoning_content or ""
            content += delta.content or ""
            assert "</think" not in (delta.reasoning_content or "")
    want_reasoning, want_content = parser.split(text)
    assert (reasoning or None, content or None) == (want_reasoning, want_content)


@pytest.mark.parametrize("name,text", [("deepseek_r1", R1), ("deepseek_r1", "  <think>" + R1), ("deepseek_r1", R1_CUT),
                                       ("qwen3", QWEN3), ("qwen3", QWEN3_NO_THINK)])
def test_every_split_point_gives_the_split(name, text):
    parser = get_reasoning_parser(name)
    for k in range(len(text) + 1):
        state = ChoiceStream(ToolPlan(), parser)
        deltas = [state.update(text[:k], False), state.update(text[k:], True)]
        reasoning = "".join(d.reasoning_content or "" for d in deltas if d is not None)
        content = "".join(d.content or "" for d in deltas if d is not None)
        assert (reasoning or None, content or None) == parser.split(text), k


def test_include_reasoning_false_sends_no_reasoning():
    state = ChoiceStream(ToolPlan(), get_reasoning_parser("deepseek_r1"), include_reasoning=False)
    delta = state.update(R1, True)
    assert delta.reasoning_content is None and delta.content == "\n\nThe answer is **4**."


def test_token_ids_of_the_tags(smollm2_tokenizer):
    # SmolLM2 has no <think> token: structured output then starts at once.
    assert reasoning_token_ids("qwen3", smollm2_tokenizer) is None

    class Vocab:
        def get_vocab(self):
            return {"<think>": 7, "</think>": 8}
    assert reasoning_token_ids("deepseek_r1", Vocab()) == (7, 8)
