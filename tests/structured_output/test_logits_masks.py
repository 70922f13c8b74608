"""The per-step logits masks: the packed bitmask means what xgrammar's does (checked against xgrammar's own
apply), bad words, min_tokens and logit_bias become the right sparse edits,; the device side's placement is tested in
tests/npu_standin/test_logits_masks_placement.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xgrammar as xgr

from npu_infer.engine.logits_rules import allowed_bitmask, gather_step_masks, make_rules
from npu_infer.sampling import SamplingParams
from npu_infer.platform.torch_ops import TorchOps
from npu_infer.worker.logits_masks import apply_logits_masks
from npu_infer.worker.step_io import LogitsMasks

VOCAB = 100
EOS = 2


def test_packed_bitmask_matches_xgrammar_apply():
    rng = np.random.default_rng(0)
    allowed = [sorted(rng.choice(VOCAB, size=k, replace=False).tolist()) for k in (1, 7, 50)]
    bitmask = np.stack([allowed_bitmask(ids, VOCAB) for ids in allowed])
    logits = torch.randn(3, VOCAB)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, torch.from_numpy(bitmask))  # xgrammar's own reading of the bits
    got = apply_logits_masks(logits.clone(), LogitsMasks(["a", "b", "c"], bitmask, [], np.zeros(0, np.int64),
                                                         np.zeros(0, np.float32)), {"a": 0, "b": 1, "c": 2}, TorchOps())
    assert torch.equal(got, want)
    for row, ids in enumerate(allowed):
        assert torch.isfinite(got[row]).nonzero().flatten().tolist() == ids


class _Tok:
    """Words as token ids: "bad" is one token, "very bad" two after a space; a real tokenizer is tested by the
    server tests."""

    def encode(self, text, add_special_tokens=False):
        return {"bad": [10], " bad": [11], "very bad": [20, 10], " very bad": [21, 11]}[text]


def test_rules_become_sparse_edits_per_row():
    params = SamplingParams(max_tokens=8, min_tokens=2, stop_token_ids=[5], logit_bias={7: 3.0},
                            bad_words=["bad", "very bad"])
    rules = make_rules(params, [1, 2], VOCAB, {EOS}, _Tok())
    plain = make_rules(SamplingParams(), [1], VOCAB, {EOS}, _Tok())
    assert plain is None  # a request with no rule costs nothing per step

    def edits(output_ids):
        masks = gather_step_masks([("r", rules, output_ids), ("p", plain, [])], VOCAB, None)
        return {int(t): float(v) for t, v in zip(masks.bias_tokens, masks.bias_values)}

    ninf = float("-inf")
    # 1-token bad words always, EOS and stop ids until min_tokens, logit_bias always.
    assert edits([]) == {10: ninf, 11: ninf, 7: 3.0, EOS: ninf, 5: ninf}
    assert edits([4, 4]) == {10: ninf, 11: ninf, 7: 3.0}
    # The last token of a 2-token bad word only after its first token.
    assert edits([4, 4, 21]) == {10: ninf, 11: ninf, 7: 3.0}
    assert edits([4, 4, 20]) == {10: ninf, 11: ninf, 7: 3.0}
    rules.bad_sequences = [[20, 12]]
    assert edits([4, 4, 20])[12] == ninf and 12 not in edits([4, 4, 21])


def test_token_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="allowed_token_ids"):
        make_rules(SamplingParams(allowed_token_ids=[VOCAB]), [1], VOCAB, {EOS}, None)
    with pytest.raises(ValueError, match="logit_bias"):
        make_rules(SamplingParams(logit_bias={-1: 1.0}), [1], VOCAB, {EOS}, None)
