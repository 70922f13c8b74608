"""The engine against transformers on tiny random Llama / Qwen2 checkpoints: same greedy tokens, same logprobs,
also with chunked prefill, forced preemption and prefix caching — and the block pool is whole afterwards.

Every test runs through each op path the CPU has (the `cpu_op_path` fixture): the AVX-512 CPU kernels where it
has AVX-512 BF16, and plain torch ops. The transformers reference does not depend on the op path: it is computed
once per model and prompts."""
from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from npu_infer import LLM, SamplingParams

PROMPT_LENS = (5, 17, 33, 40)
NEW_TOKENS = 32


def random_prompts(vocab: int, lens=PROMPT_LENS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


@functools.cache
def reference_model(model_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@functools.cache
def _reference_greedy(model_dir, prompts: tuple[tuple[int, ...], ...], new_tokens: int) -> tuple[tuple[int, ...], ...]:
    ref = reference_model(model_dir)
    out = []
    for p in prompts:
        # An explicit mask: otherwise generate() masks prompt tokens equal to pad_token_id.
        ids = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(tuple(ids[0, len(p):].tolist()))
    return tuple(out)


def reference_greedy(model_dir, prompts, new_tokens=NEW_TOKENS) -> list[list[int]]:
    """transformers' greedy tokens, computed once per model, prompts and length (whichever op path asks)."""
    return [list(t) for t in _reference_greedy(model_dir, tuple(map(tuple, prompts)), new_tokens)]


def make_llm(model_dir, **kwargs) -> LLM:
    args = dict(device="cpu", dtype="float32", kv_cache_memory="8MiB", skip_tokenizer_init=True, max_model_len=256,
                max_num_seqs=8)
    args.update(kwargs)
    return LLM(str(model_dir), **args)


def generate_greedy(llm: LLM, prompts, new_tokens=NEW_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]


def assert_pool_whole(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


@pytest.fixture(autouse=True, scope="module")
def _each_op_path(cpu_op_path):
    return cpu_op_path


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_reference(request, tiny_llama_dir, tiny_qwen2_dir):
    model_dir = tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir
    prompts = random_prompts(256)
    return model_dir, prompts, reference_greedy(model_dir, prompts)


def test_greedy_batch_matches_transformers(model_and_reference):
    model_dir, prompts, expected = model_and_reference
    llm = make_llm(model_dir)
    assert generate_greedy(llm, prompts) == expected
    # all prompts were prefilled together, then decoded together
    assert llm.engine.stats.max_batch_size == len(prompts)
    assert_pool_whole(llm)


def test_equal_length_prefills_batched_match_transformers(model_and_reference):
    """Prompts of one length, prefilled in one step, go through one batched SDPA call (a second code path)."""
    model_dir, _, _ = model_and_reference
    prompts = random_prompts(256, lens=(12, 12, 12, 7, 12), seed=3)  # a run of three, a break, one more
    llm = make_llm(model_dir)
    assert generate_greedy(llm, prompts, new_tokens=8) == reference_greedy(model_dir, prompts, new_tokens=8)
    assert llm.engine.stats.max_batch_size == len(prompts)
    assert_pool_whole(llm)


def test_many_decodes_match_transformers(model_and_reference):
    """Plain torch: from MATMUL_DECODE_MIN_BATCH decoding sequences on, decode attention is two batched matmuls, not
    SDPA. With the CPU kernels: decode_attention over 10 sequences, split across both threads."""
    from npu_infer.platform.torch_attention import MATMUL_DECODE_MIN_BATCH
    model_dir, _, _ = model_and_reference
    prompts = random_prompts(256, lens=(3, 9, 14, 20, 5, 27, 11, 16, 8, 30), seed=5)
    assert len(prompts) >= MATMUL_DECODE_MIN_BATCH
    llm = make_llm(model_dir, max_num_seqs=16)
    assert generate_greedy(llm, prompts, new_tokens=12) == reference_greedy(model_dir, prompts, new_tokens=12)
    assert llm.engine.stats.max_batch_size == len(prompts)
    assert_pool_whole(llm)


def test_chunked_prefill_matches_transformers(model_and_reference):
    model_dir, prompts, expected = model_and_reference
    llm = make_llm(model_dir, max_num_batched_tokens=8, max_num_seqs=4)
    assert generate_greedy(llm, prompts) == expected
    assert llm.engine.stats.num_steps > NEW_TOKENS + sum(PROMPT_LENS) // 8 - 1  # prompts really were chunked
    assert_pool_whole(llm)


def test_preemption_matches_transformers(model_and_reference):
    model_dir, prompts, expected = model_and_reference
    # 12 blocks of 16 tokens cannot hold four sequences of up to 72 tokens: someone must give way.
    llm = make_llm(model_dir, num_gpu_blocks_override=12, max_model_len=128)
    assert generate_greedy(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert_pool_whole(llm)


def test_prefix_caching_same_tokens_and_hits(model_and_reference):
    model_dir, prompts, _ = model_and_reference
    shared = random_prompts(256, lens=(40,), seed=7)[0]
    with_prefix = [shared + p for p in prompts]
    expected = reference_greedy(model_dir, with_prefix, new_tokens=8)
    llm = make_llm(model_dir, enable_prefix_caching=True)
    assert generate_greedy(llm, with_prefix[:1], 8) == expected[:1]  # fills the cache
    assert generate_greedy(llm, with_prefix[1:], 8) == expected[1:]
    bm = llm.engine.block_manager
    assert bm.prefix_hits >= 3 * 32  # two full 16-token blocks of the shared prefix, three requests
    assert_pool_whole(llm)


def test_prompt_logprobs_equal_transformers(model_and_reference):
    model_dir, prompts, _ = model_and_reference
    llm = make_llm(model_dir, max_num_batched_tokens=16, max_num_seqs=4)
    ref = reference_model(model_dir)
    out = llm.generate([{"prompt_token_ids": prompts[-1]}], SamplingParams(max_tokens=1, prompt_logprobs=5,
                                                                          temperature=0))[0]
    with torch.no_grad():
        ref_logprobs = ref(torch.tensor([prompts[-1]])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompts[-1])
    for pos in range(1, len(prompts[-1])):
        entry = out.prompt_logprobs[pos]
        for token, lp in entry.items():
            assert lp.logprob == pytest.approx(ref_logprobs[pos - 1, token].item(), abs=1e-4)
        top = ref_logprobs[pos - 1].topk(5)
        assert set(top.indices.tolist()) <= set(entry)
    assert_pool_whole(llm)
