"""JSON constraints cap the free whitespace in each gap at JSON_MAX_WHITESPACE characters, in both backends: a
sampled answer cannot spend max_tokens on newlines and come back cut short (seen in CI: SmolLM2 at temperature 0.8
wrote '{"name":"Puppy(0)"' and then 280 newlines). Up to the cap is still accepted, so pretty-printed JSON fits."""
from __future__ import annotations

import pytest
import torch

from npu_infer.structured_output.guidance_backend import GuidanceBackend
from npu_infer.structured_output.params import JSON_MAX_WHITESPACE, StructuredOutputsParams
from npu_infer.structured_output.xgrammar_backend import XgrammarBackend

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@pytest.fixture(scope="module", params=[XgrammarBackend, GuidanceBackend])
def backend(request, smollm2_tokenizer):
    return request.param(smollm2_tokenizer, len(smollm2_tokenizer), [smollm2_tokenizer.eos_token_id])


def _accepts(backend, tokenizer, params, text: str) -> bool:
    matcher = backend.matcher(backend.compile(params))
    # One token per character, as a model that emits newlines one by one does.
    ids = [i for ch in text for i in tokenizer.encode(ch, add_special_tokens=False)]
    return all(matcher.accept(i) for i in ids)


@pytest.mark.parametrize("kind", ["json", "json_object"])
def test_whitespace_in_a_gap_is_capped(backend, smollm2_tokenizer, kind):
    params = StructuredOutputsParams(json=SCHEMA) if kind == "json" else StructuredOutputsParams(json_object=True)
    head = '{"name": "Ann"'
    assert _accepts(backend, smollm2_tokenizer, params, head + "\n" * JSON_MAX_WHITESPACE + "}")
    assert _accepts(backend, smollm2_tokenizer, params, '{\n  "name": "Ann"\n}')  # pretty-printed
    assert not _accepts(backend, smollm2_tokenizer, params, head + "\n" * (JSON_MAX_WHITESPACE + 1))


def test_disable_any_whitespace_still_refuses_all_of_it(backend, smollm2_tokenizer):
    params = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    assert not _accepts(backend, smollm2_tokenizer, params, '{"name": "Ann"\n')


def test_the_bitmask_at_the_cap_leaves_no_newline(backend, smollm2_tokenizer):
    params = StructuredOutputsParams(json=SCHEMA)
    matcher = backend.matcher(backend.compile(params))
    for i in smollm2_tokenizer.encode('{"name": "Ann"', add_special_tokens=False) + \
            smollm2_tokenizer.encode("\n", add_special_tokens=False) * JSON_MAX_WHITESPACE:
        assert matcher.accept(i)
    bitmask = torch.zeros(1, (len(smollm2_tokenizer) + 31) // 32, dtype=torch.int32)
    matcher.fill(bitmask, 0)
    newline = smollm2_tokenizer.encode("\n", add_special_tokens=False)[0]
    assert not (bitmask[0, newline // 32] >> (newline % 32)) & 1
    close = smollm2_tokenizer.encode("}", add_special_tokens=False)[0]
    assert (bitmask[0, close // 32] >> (close % 32)) & 1
