"""End to end on the stand-in: LLM(device="npu") gives the CPU backend's greedy tokens.

Both runs are bf16 on the same weights; only the kernels differ (torch_npu's fused ops and paged attention on
the NPU path, plain torch on the CPU path).  bf16 results of two correct kernels differ in the last bits, so on
these models (random tiny ones especially, whose next-token distributions are flat) greedy decoding can pick
different tokens where the two best candidates are within rounding of each other.  The check is therefore
`compare_greedy` (_e2e.py): identical tokens with logprobs within 0.25 nats (two bf16 rounding steps of a logit
near 20) and a median difference under 0.05 until the runs first differ, and that first difference must be a
near-tie in both runs; most tokens must agree outright.  A kernel bug (mask, positions, cache slots, GQA
mapping) moves most logprobs by tenths of a nat or more and fails it (test_e2e_parity_check_catches_a_bug).

The workload exercises what the NPU backend does differently: chunked prefill (max_num_batched_tokens=64 splits
the long prompts), steps mixing decodes with prefill chunks, and prefix-cache hits (prompts sharing a prefix
longer than one 128-token block with an earlier prompt: in a second batch for the tiny models; within the one
batch for SmolLM2, whose second prompt is admitted after the first one's first block is computed).
"""

from __future__ import annotations

import gc

import pytest
import torch

from npu_infer import LLM, SamplingParams

from . import install, uninstall
from ._e2e import compare_greedy, install_spy

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

ENGINE = dict(dtype="bfloat16", max_model_len=512, max_num_batched_tokens=64, max_num_seqs=8,
              enable_prefix_caching=True, kv_cache_memory="64MiB")
PARAMS = SamplingParams(temperature=0.0, max_tokens=16, logprobs=2, ignore_eos=True)
SMOLLM2_PARAMS = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, ignore_eos=True)  # CI time: few tokens
# About 190 SmolLM2 tokens: prompts that share it share one full 128-token block.
STORY = ("The lighthouse keeper wrote in his logbook every evening. He noted the wind, the height of the waves, "
         "the ships that passed and the birds that rested on the gallery rail. In winter the storms came from "
         "the north and the lamp had to be trimmed twice a night; in summer the fog rolled in from the sea and "
         "the horn sounded until dawn. His daughter learned to read from the logbook, and by the age of ten she "
         "could tell a schooner from a brig by the shape of its sails alone. The supply boat came once a month "
         "with flour, oil for the lamp, letters and newspapers that were already three weeks old. The keeper read "
         "every page aloud at supper, the advertisements included, while the wind rattled the shutters and the "
         "beam of the lamp swept across the water above them. One autumn a small boat with a torn sail drifted "
         "towards the rocks, and ")


def token_workload(seed: int = 0):
    """Token-id prompts for the tiny models (vocabulary 256): two batches, the second sharing prefixes with the
    first; returns (batches, indices of the prompts that must hit the prefix cache)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 256, (n,), generator=g).tolist()  # noqa: E731
    p0, p1, p2, p3 = ids(300), ids(170), ids(40), ids(5)
    first = [p0, p1, p2, p3]
    second = [p0[:260] + ids(20), p1 + ids(7), ids(9)]
    batches = [[{"prompt_token_ids": p} for p in first], [{"prompt_token_ids": p} for p in second]]
    return batches, [4, 5]


def text_workload():
    """One batch for SmolLM2 (CI time); the second story prompt reuses the first one's computed block."""
    return [[STORY + "the keeper", STORY + "nobody", "1, 2, 3, 4, 5,", "The capital of France is"]], [1]


def run(model: str, device: str, batches, params, **kwargs):
    llm = LLM(model, device=device, **ENGINE, **kwargs)
    outputs = [out for batch in batches for out in llm.generate(batch, params)]
    config = llm.engine.config
    del llm
    gc.collect()
    return outputs, config


def check_parity(model: str, batches, cached, monkeypatch, min_agreement: float, params=PARAMS, **kwargs):
    # The CPU run goes first, without the stand-in: as on a machine without torch_npu.  (With the stand-in
    # installed, libraries that probe for torch_npu, e.g. transformers' modeling imports, would find it.)
    cpu_out, _ = run(model, "cpu", batches, params, **kwargs)
    npu = install(strict=True)  # device-strict: a host tensor mixed into the step fails the run
    try:
        spy = install_spy(npu, monkeypatch)
        npu_out, config = run(model, "npu", batches, params, **kwargs)
    finally:
        monkeypatch.undo()
        uninstall()

    assert config.block_size == 128 and config.torch_dtype == torch.bfloat16
    assert all(spy.kernels.get(k) for k in ("npu_rms_norm", "npu_add_rms_norm", "npu_swiglu", "_npu_paged_attention",
                                            "npu_fused_infer_attention_score", "_npu_reshape_and_cache",
                                            "_npu_rotary_embedding")), spy.kernels
    assert spy.mixed_steps, "no step mixed decodes with prefills"
    assert spy.chunked_prefill_steps, "no prefill chunk ran over context already in the cache"
    assert all(npu_out[i].num_cached_tokens >= 128 for i in cached), "no prefix-cache hit"

    return compare_greedy(cpu_out, npu_out, min_agreement)


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_tiny_models_match_cpu(model_fixture, request, monkeypatch):
    model = str(request.getfixturevalue(model_fixture))
    batches, cached = token_workload()
    # Random tiny models have flat next-token distributions: near-ties come early and often.
    check_parity(model, batches, cached, monkeypatch, min_agreement=0.6, skip_tokenizer_init=True)


def test_smollm2_matches_cpu(smollm2_hf_dir, monkeypatch):
    batches, cached = text_workload()
    # A trained model has peaked distributions: near-ties are rarer.
    check_parity(str(smollm2_hf_dir), batches, cached, monkeypatch, min_agreement=0.8, params=SMOLLM2_PARAMS)


def test_e2e_parity_check_catches_a_bug(tiny_llama_dir, monkeypatch):
    """The comparison is not vacuous: decode attention that misses each sequence's newest cached token (a valid
    call the stand-in cannot reject) fails it."""
    from npu_infer.platform import npu_attention
    build_metadata = npu_attention.NpuAttentionBackend.build_metadata

    def off_by_one(self, common):
        meta = build_metadata(self, common)
        if meta.decode_context_lens is not None:
            meta.decode_context_lens = meta.decode_context_lens - 1
        return meta
    monkeypatch.setattr(npu_attention.NpuAttentionBackend, "build_metadata", off_by_one)
    batches, cached = token_workload()
    with pytest.raises(AssertionError, match="logprobs differ|not a near-tie|median|only .* tokens|neither run"):
        check_parity(str(tiny_llama_dir), batches, cached, monkeypatch, min_agreement=0.6, skip_tokenizer_init=True)
