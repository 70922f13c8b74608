"""Tool calls streamed as the model writes them (vLLM's hermes / llama3_json / "required" streaming, OpenAI's
delta framing): every recorded output fed in every split, folded as a client folds deltas, gives exactly the
non-streamed message; a call opens with id / type / name, then sends only arguments; no call text leaks into content."""
from __future__ import annotations

import random

import pytest

from api.test_tool_parsers import CASES, QWEN_ONE, QWEN_TRICKY, REQUIRED, call_format
from npu_infer.api.chat_output import ChoiceStream, ToolPlan, final_message
from npu_infer.reasoning import get_reasoning_parser


def plan_for(name: str, parallel: bool = True) -> ToolPlan:
    mode = "required" if name == "required" else "auto"
    return ToolPlan(mode, parser=call_format(name) if mode == "auto" else None, parallel=parallel)


def stream(plan: ToolPlan, pieces: list[str], reasoning: str | None = None) -> tuple[list[dict], ChoiceStream]:
    state = ChoiceStream(plan, get_reasoning_parser(reasoning) if reasoning else None)
    deltas = []
    for i, piece in enumerate(pieces):
        delta = state.update(piece, i == len(pieces) - 1)
        if delta is not None:
            deltas.append(delta.model_dump())
    return deltas, state


def fold(deltas: list[dict]) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    """(reasoning, content, [(name, arguments)]) as a client folds the deltas; checks the framing on the way."""
    reasoning = content = ""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        reasoning += d.get("reasoning_content", "")
        content += d.get("content", "")
        indexes = [c["index"] for c in d.get("tool_calls", [])]
        assert len(indexes) == len(set(indexes)), d  # one entry per call in a delta
        for call in d.get("tool_calls", []):
            if call["index"] not in calls:  # the opening: id, type and name, once
                assert call["index"] == len(calls), d
                assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function", d
                calls[call["index"]] = [call["function"]["name"], call["function"]["arguments"]]
            else:  # then only more arguments
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}, d
                assert call["function"]["arguments"], d
                calls[call["index"]][1] += call["function"]["arguments"]
    return reasoning or None, content or None, [tuple(c) for c in calls.values()]


def whole(plan: ToolPlan, text: str, reasoning: str | None = None):
    message, finish = final_message(text, "stop", plan, get_reasoning_parser(reasoning) if reasoning else None)
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    return (message.reasoning_content, message.content, calls), finish


def splits(text: str) -> list[list[str]]:
    """One character at a time; every single split point; a few random chunkings (engine DELTA outputs)."""
    out = [list(text), [text]]
    out += [[text[:k], text[k:]] for k in range(1, len(text))]
    rng = random.Random(len(text))
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return out


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_every_split_folds_into_the_non_streamed_message(name, text, content, calls):
    plan = plan_for(name)
    want, finish = whole(plan, text)
    assert want == (None, content, calls)
    for pieces in splits(text):
        deltas, state = stream(plan, pieces)
        assert fold(deltas) == want, pieces
        assert state.finish_reason("stop") == finish == ("tool_calls" if calls else "stop")
        for leak in ("<tool_call", "python_tag", '"name"', '"parameters"', '"arguments"'):
            if calls and leak not in (content or ""):  # no call text leaks into content
                assert all(leak not in d.get("content", "") for d in deltas), pieces


@pytest.mark.parametrize("name,text", [("hermes", QWEN_ONE), ("hermes", QWEN_TRICKY), ("required", REQUIRED)])
def test_arguments_arrive_as_they_are_written(name, text):
    deltas, _ = stream(plan_for(name), list(text))
    openings = [d for d in deltas if any("id" in c for c in d.get("tool_calls", []))]
    assert all(c["function"]["arguments"] == "" for d in openings for c in d["tool_calls"])  # the name, at once
    for index, (_, arguments) in enumerate(whole(plan_for(name), text)[0][2]):
        pieces = [c["function"]["arguments"] for d in deltas for c in d.get("tool_calls", []) if c["index"] == index]
        # Every character of the arguments goes out as soon as it is read: nothing held but the wrapper's "}".
        assert pieces[1:] == list(arguments), pieces


def test_content_before_a_call_streams_before_the_call_is_whole():
    text = "Let me look.\n<tool_call>\n" + QWEN_ONE.removeprefix("<tool_call>\n")
    deltas, _ = stream(plan_for("hermes"), [text[:4], text[4:30], text[30:]])
    assert deltas[0] == {"content": "Let"}  # the space is held until a word follows
    assert deltas[1] == {"content": " me look."}  # the newline and the tag are held, then dropped


def test_reasoning_then_a_call():
    text = "<think>\nThe user wants Dallas; call the tool.\n</think>\n\n" + QWEN_ONE
    plan = plan_for("hermes")
    want, finish = whole(plan, text, "qwen3")
    assert want[0] == "\nThe user wants Dallas; call the tool.\n" and want[1] is None and len(want[2]) == 1
    for pieces in splits(text):
        deltas, state = stream(plan, pieces, "qwen3")
        assert fold(deltas) == want, pieces
        assert state.finish_reason("stop") == finish == "tool_calls"


def test_parallel_tool_calls_false_sends_only_the_first_call():
    plan = plan_for("llama3_json", parallel=False)
    text = [t for n, t, _, calls in CASES if n == "llama3_json" and len(calls) == 2][0]
    want, _ = whole(plan, text)
    assert len(want[2]) == 1
    for pieces in (list(text), [text]):
        assert fold(stream(plan, pieces)[0]) == want


def test_choices_stream_independently():
    # n > 1: one ChoiceStream per choice; interleaved updates do not mix.
    plan = plan_for("hermes")
    a, b = ChoiceStream(plan, None), ChoiceStream(plan, None)
    texts = [QWEN_ONE, "Just text, no <tool_call here."]
    deltas: list[list[dict]] = [[], []]
    for i in range(max(map(len, texts))):
        for state, text, out in zip((a, b), texts, deltas):
            if i < len(text):
                delta = state.update(text[i], i == len(text) - 1)
                if delta is not None:
                    out.append(delta.model_dump())
    assert [fold(d) for d in deltas] == [whole(plan, t)[0] for t in texts]


def test_long_answer_stays_linear():
    # The stream keeps only what it may still need, not the whole answer.
    state = ChoiceStream(plan_for("hermes"), None)
    for _ in range(2000):
        state.update("word " * 10, False)
    assert len(state.calls.text) < 100
    state = ChoiceStream(plan_for("required"), None)
    state.update('[{"name": "f", "parameters": {"text": "', False)
    for _ in range(2000):
        state.update("word " * 10, False)
    assert len(state.calls.text) < 100
