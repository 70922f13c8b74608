"""Structured outputs in the engine: the constraint holds for every one of n completions, across preemption and
recompute (the matcher keeps the accepted tokens, which recompute does not change), when the grammar is
llguidance's, and with the model split over processes (tp=2, pp=2), token for token as in one process; structured
output waits until the reasoning ends."""
from __future__ import annotations

import json
import re

import pytest

from npu_infer import LLM, SamplingParams
from npu_infer.structured_output import StructuredOutputsParams

ENGINE = dict(device="cpu", dtype="float32", max_model_len=256, max_num_batched_tokens=256)
PATTERN = r"[a-f]{3}-[0-9]{4}"


def _regex_params(**kw):
    return SamplingParams(temperature=1.0, seed=5, max_tokens=12, structured_outputs=StructuredOutputsParams(
        regex=PATTERN), **kw)


def test_n_completions_and_preemption_keep_the_constraint(tiny_chat_model_dir):
    # 8 KV blocks of 16 tokens for 16 sequences that each need 2: decodes run out of blocks and preempt.
    llm = LLM(str(tiny_chat_model_dir), num_gpu_blocks_override=8, block_size=16, **{**ENGINE, "max_model_len": 128})
    prompts = [f"request number {i} " * 3 for i in range(8)]
    outs = llm.generate(prompts, _regex_params(n=2))
    assert llm.engine.scheduler.num_preemptions > 0
    for out in outs:
        assert len(out.outputs) == 2
        for choice in out.outputs:
            assert re.fullmatch(PATTERN, choice.text), choice.text
    assert not llm.engine.requests  # every request, with its grammar matcher, is gone


def test_llguidance_fallback_enforces_what_xgrammar_ignores(tiny_chat_model_dir):
    llm = LLM(str(tiny_chat_model_dir), **ENGINE)
    schema = {"type": "integer", "multipleOf": 7, "minimum": 1, "maximum": 999}
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=8, n=6,
                            structured_outputs=StructuredOutputsParams(json=schema))
    backend, _ = llm.engine.structured_outputs.compile(params.structured_outputs)
    assert backend.name == "guidance"
    for choice in llm.generate("number:", params)[0].outputs:
        assert json.loads(choice.text) % 7 == 0, choice.text
    strict = LLM(str(tiny_chat_model_dir), structured_outputs_backend="xgrammar", **ENGINE)
    with pytest.raises(ValueError, match="multipleOf"):
        strict.generate("number:", params)


def test_structured_output_starts_after_the_reasoning(tiny_chat_model_dir, monkeypatch):
    llm = LLM(str(tiny_chat_model_dir), reasoning_parser="deepseek_r1", **ENGINE)
    think_end = 1000  # stand-in for </think> (SmolLM2 has none); not in the prompt
    monkeypatch.setattr(type(llm.engine), "reasoning_token_ids", property(lambda self: (None, think_end)))
    bias = {think_end: 100.0}  # the model "ends its reasoning" at once, then must follow the choice
    params = SamplingParams(temperature=0, max_tokens=6, logit_bias=bias,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    out = llm.generate("question:", params)[0].outputs[0]
    assert out.token_ids[0] == think_end
    tail = llm.get_tokenizer().decode(out.token_ids[1:], skip_special_tokens=True)
    assert tail in ("yes", "no"), out.text


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_split_model_gives_the_same_constrained_tokens(tiny_chat_model_dir, parallel):
    params = SamplingParams(temperature=0, max_tokens=10, structured_outputs=StructuredOutputsParams(
        json={"type": "object", "properties": {"k": {"type": "string", "enum": ["ab", "cd"]}}, "required": ["k"]},
        disable_any_whitespace=True))
    want = [o.outputs[0].token_ids for o in LLM(str(tiny_chat_model_dir), **ENGINE).generate(["a", "b c"], params)]
    split = LLM(str(tiny_chat_model_dir), **ENGINE, **parallel)
    try:
        got = split.generate(["a", "b c"], params)
    finally:
        split.engine.shutdown()
    assert [o.outputs[0].token_ids for o in got] == want
    assert all(json.loads(o.outputs[0].text)["k"] in ("ab", "cd") for o in got)


def test_offline_chat_passes_tools_to_the_template(tiny_chat_model_dir):
    llm = LLM(str(tiny_chat_model_dir), **ENGINE)
    template = "{% for t in tools %}{{ t.function.name }};{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1), chat_template=template,
                   tools=tools)[0]
    assert llm.get_tokenizer().decode(out.prompt_token_ids) == "get_weather;hi"


def test_the_bitmask_is_filled_after_the_forward_is_queued(tiny_chat_model_dir):
    """In one process the grammar bitmask is built after the model's forward was issued and before sampling, so
    a device runs the forward while the host fills it (on the CPU backend the two simply follow each other)."""
    llm = LLM(str(tiny_chat_model_dir), **ENGINE)
    events = []
    model = llm.engine.executor.worker.model
    forward = model.forward
    model.forward = lambda *a, **kw: (events.append("forward"), forward(*a, **kw))[1]
    manager = llm.engine.structured_outputs
    fill = manager.fill_bitmask
    manager.fill_bitmask = lambda *a: (events.append("bitmask"), fill(*a))[1]
    out = llm.generate(["a"], _regex_params())[0].outputs[0]
    assert re.fullmatch(PATTERN, out.text)
    steps = [events[i:i + 2] for i in range(0, len(events), 2)]
    assert steps and all(step == ["forward", "bitmask"] for step in steps), events
