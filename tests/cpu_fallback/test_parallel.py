"""tp=2, pp=2 and tp=2 x pp=2 over real worker processes (gloo) give tp=1's tokens and logprobs, on tiny models.

Llama: 4 query heads and 1 KV head (replicated on both TP ranks), 3 layers (pp=2 splits them 1 + 2), untied head.
Qwen2: 4 query heads and 2 KV heads (one per TP rank), QKV biases, tied embeddings, a vocabulary of 255 that
leaves the last TP shard padded. The engine schedules with the block count of the rank that holds the fewest.
Prompts of 3..40 tokens with a 32-token step budget, so steps mix chunked
prefills with decodes; greedy requests and seeded random ones run in the same batch."""
from __future__ import annotations

import json

import pytest

from conftest import make_tiny_model
from npu_infer import LLM, SamplingParams

ENGINE = dict(device="cpu", dtype="float32", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32,
              kv_cache_memory="4MiB", skip_tokenizer_init=True)
PROMPTS = [[(7 * i + 3 * j) % 250 + 1 for j in range(n)] for i, n in enumerate((3, 9, 17, 40))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, prompt_logprobs=3, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=8, logprobs=5, ignore_eos=True)
MODELS = {"llama-kv-replicated": dict(arch="llama", num_layers=3, num_heads=4, num_kv_heads=1),
          "qwen2-kv-split-padded-vocab": dict(arch="qwen2", num_layers=4, num_heads=4, num_kv_heads=2,
                                              vocab_size=255)}


def generate(model_dir, tp: int = 1, pp: int = 1):
    llm = LLM(str(model_dir), tensor_parallel_size=tp, pipeline_parallel_size=pp, **ENGINE)
    try:
        outs = llm.generate(PROMPTS * 2, [GREEDY] * len(PROMPTS) + [SEEDED] * len(PROMPTS))
        num_blocks = llm.engine.block_manager.num_blocks
        assert llm.engine.memory["num_blocks"] == num_blocks  # what the start-up log reports
    finally:
        llm.engine.shutdown()
    return outs, num_blocks


def fewest_blocks_of_any_rank(model_dir, tp: int, pp: int) -> int:
    """4 MiB of KV cache per rank over the K and V of that rank's KV heads and layers (fp32, 16-token blocks):
    the stage with the most layers (pp=2 over 3 layers: 1 + 2) holds the fewest blocks."""
    hf = json.loads((model_dir / "config.json").read_text())
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    kv_heads = max(1, hf["num_key_value_heads"] // tp)  # replicated when fewer than tp
    most_layers = -(-hf["num_hidden_layers"] // pp)
    return 4 * 2**20 // (2 * 16 * kv_heads * head_dim * most_layers * 4)


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_reference(request, tmp_path_factory):
    spec = dict(MODELS[request.param])
    model_dir = make_tiny_model(tmp_path_factory.mktemp(request.param), spec.pop("arch"), **spec)
    return model_dir, generate(model_dir)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_parallel_layout_gives_single_process_tokens_and_logprobs(model_and_reference, tp, pp):
    model_dir, (reference, reference_blocks) = model_and_reference
    outputs, num_blocks = generate(model_dir, tp, pp)
    assert reference_blocks == fewest_blocks_of_any_rank(model_dir, 1, 1)
    assert num_blocks == fewest_blocks_of_any_rank(model_dir, tp, pp)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in reference]
    assert [len(o.prompt_logprobs or []) for o in reference] == [len(p) for p in PROMPTS] + [0] * len(PROMPTS)
    for out, ref in zip(outputs, reference):
        # Top-5 logprobs of every sampled token and top-3 of every prompt position (the gathered logits).
        positions = list(zip(out.outputs[0].logprobs, ref.outputs[0].logprobs))
        positions += list(zip(out.prompt_logprobs or [], ref.prompt_logprobs or []))
        assert len(out.prompt_logprobs or []) == len(ref.prompt_logprobs or [])
        for got, want in positions:
            if want is None:  # the first prompt token has none
                assert got is None
                continue
            assert got.keys() == want.keys()
            for token, lp in want.items():
                assert got[token].logprob == pytest.approx(lp.logprob, abs=1e-4)
