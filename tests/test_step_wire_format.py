"""Step messages between nodes are JSON of known types: a StepInput / StepOutput comes back equal, and bytes that
are not such a message (a pickle, say) are refused without being executed."""
from __future__ import annotations

import os
import pickle

import pytest

from npu_infer.sampling import SamplingParams
from npu_infer.worker.step_io import NewRequest, SeqChunk, StepInput, StepOutput, decode_message, encode_message


def test_step_input_and_output_round_trip():
    params = SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=5, seed=2**63 - 1, stop=["\n", "。"],
                            stop_token_ids=[7], logprobs=3, prompt_logprobs=1, repetition_penalty=1.1)
    step = StepInput([SeqChunk("r#1", [5, 6], 3, [0, 4], True), SeqChunk("s", [1], 0, [], False)],
                     [NewRequest("r#1", params, 1, 3, [1, 2, 3]), NewRequest("s", SamplingParams())],
                     finished_ids=["old"])
    method, decoded = decode_message(encode_message("execute", step))
    assert method == "execute" and decoded == step
    out = StepOutput(sampled={"r#1": 3}, logprobs={"r#1": (-0.5, 1, [3, 4], [-0.5, float("-inf")])},
                     prompt_logprobs={"r#1": [(-1.0, 2, [8], [-0.2])]}, errors={"s": "sampling failed"})
    _, back = decode_message(encode_message("ok", out))
    assert back.sampled == out.sampled and back.errors == out.errors
    assert [tuple(x) for x in back.prompt_logprobs["r#1"]] == [(-1.0, 2, [8], [-0.2])]
    assert tuple(back.logprobs["r#1"]) == out.logprobs["r#1"]
    assert decode_message(encode_message("init_kv_cache", 12)) == ("init_kv_cache", 12)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/npu_infer_wire_pwned",))


@pytest.mark.parametrize("data", [
    pickle.dumps(("execute", _Boom())), b"\x80\x04junk", b'["execute", {"type": "X"}]',
    b'["execute", {"type": "StepInput", "chunks": [{"params": {}}]}]',
    b'["execute", {"type": "StepInput", "chunks": [], "new_requests": [{"params": {}}]}]'])
def test_anything_else_is_refused_unexecuted(data):
    with pytest.raises(ValueError, match="another node"):
        decode_message(data)
    assert not os.path.exists("/tmp/npu_infer_wire_pwned")


def test_objects_without_a_wire_form_are_not_sent():
    with pytest.raises(TypeError, match="cannot send"):
        encode_message("execute", object())


def test_logits_masks_travel_and_grammars_stay_with_the_engine():
    import numpy as np

    from npu_infer.structured_output.params import StructuredOutputsParams
    from npu_infer.worker.step_io import LogitsMasks
    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[0-9]+"), logit_bias={5: -100.0})
    masks = LogitsMasks(["r"], np.array([[7, -1]], dtype=np.int32), ["r"], np.array([5], dtype=np.int64),
                        np.array([float("-inf")], dtype=np.float32))
    _, back = decode_message(encode_message("execute", StepInput([SeqChunk("r", [1], 0, [0], True)],
                                                                 [NewRequest("r", params)], logits_masks=masks)))
    back_params = back.new_requests[0].params
    assert back_params.structured_outputs is None and back_params.logit_bias == {5: -100.0}
    m = back.logits_masks
    assert m.bitmask.dtype == np.int32 and m.bitmask.tolist() == [[7, -1]] and m.bias_values[0] == float("-inf")
    assert m.bias_tokens.dtype == np.int64 and m.mask_ids == ["r"] and m.bias_ids == ["r"]
