"""Layer partition over pipeline stages, weight-shard slicing over tensor-parallel ranks, and the layout checks.

No processes: each TP rank's layer is built under a stand-in group whose collectives are the identity, so the
ranks' shards and partial results can be put together here and compared with the unsharded layer."""
from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from npu_infer.config import EngineConfig
from npu_infer.distributed import parallel_state
from npu_infer.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from npu_infer.models.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                            RowParallelLinear)
from npu_infer.models.llama import pp_layer_range
from npu_infer.engine_args import engine_config_kwargs
from npu_infer.worker.parallel_layout import check_parallel_config, output_rank, ranks_of_node
from npu_infer.worker.worker_cli import make_parser as worker_parser


class _LocalGroup(parallel_state.GroupCoordinator):
    """One rank's view of a TP group, without communication: the test sums / concatenates the ranks itself."""

    def all_reduce(self, x):
        return x

    def all_gather(self, x, dim=-1):
        return x


@contextmanager
def tp_rank(rank: int, size: int):
    saved = parallel_state._TP, parallel_state._PP
    parallel_state._TP = _LocalGroup(list(range(size)), rank)
    parallel_state._PP = _LocalGroup([rank], rank)
    try:
        yield
    finally:
        parallel_state._TP, parallel_state._PP = saved


def build_ranks(size: int, make):
    layers = []
    for rank in range(size):
        with tp_rank(rank, size):
            layers.append(make())
    return layers


# ---- pipeline stages ----------------------------------------------------------------------------------------
def test_even_split_gives_later_stages_the_remaining_layers(monkeypatch):
    monkeypatch.delenv("NPU_INFER_PP_LAYER_PARTITION", raising=False)
    assert [pp_layer_range(5, r, 2) for r in range(2)] == [(0, 2), (2, 5)]
    assert [pp_layer_range(30, r, 4) for r in range(4)] == [(0, 7), (7, 14), (14, 22), (22, 30)]
    assert [pp_layer_range(4, r, 1) for r in range(1)] == [(0, 4)]


def test_layer_partition_env_overrides_the_even_split(monkeypatch):
    monkeypatch.setenv("NPU_INFER_PP_LAYER_PARTITION", "1,3")
    assert [pp_layer_range(4, r, 2) for r in range(2)] == [(0, 1), (1, 4)]


@pytest.mark.parametrize("spec", ["2,2", "0,5", "1,1,3"])
def test_layer_partition_that_does_not_fit_is_refused(monkeypatch, spec):
    monkeypatch.setenv("NPU_INFER_PP_LAYER_PARTITION", spec)
    with pytest.raises(ValueError, match="NPU_INFER_PP_LAYER_PARTITION"):
        pp_layer_range(5, 0, 2)


def test_more_stages_than_layers_is_refused(monkeypatch):
    monkeypatch.delenv("NPU_INFER_PP_LAYER_PARTITION", raising=False)
    with pytest.raises(ValueError, match="3 layers cannot be split over 4"):
        pp_layer_range(3, 0, 4)


# ---- tensor-parallel weight shards --------------------------------------------------------------------------
def test_column_parallel_shards_concatenate_to_the_full_weight():
    full_w, full_b = torch.randn(12, 8), torch.randn(12)
    layers = build_ranks(3, lambda: ColumnParallelLinear(8, 12, bias=True))
    for layer in layers:
        layer.weight.weight_loader(layer.weight, full_w)
        layer.bias.weight_loader(layer.bias, full_b)
    x = torch.randn(5, 8)
    assert torch.equal(torch.cat([layer.weight for layer in layers]), full_w)
    torch.testing.assert_close(torch.cat([layer(x) for layer in layers], dim=-1), F.linear(x, full_w, full_b))


def test_merged_gate_up_shard_holds_its_slice_of_gate_and_of_up():
    gate, up = torch.randn(16, 8), torch.randn(16, 8)
    layers = build_ranks(2, lambda: MergedColumnParallelLinear(8, [16, 16]))
    for layer in layers:
        layer.weight_loader(layer.weight, gate, 0)
        layer.weight_loader(layer.weight, up, 1)
    for rank, layer in enumerate(layers):
        assert torch.equal(layer.weight[:8], gate[rank * 8:(rank + 1) * 8])
        assert torch.equal(layer.weight[8:], up[rank * 8:(rank + 1) * 8])


def _qkv(num_heads, num_kv_heads, head_dim, tp):
    hidden = 8
    q = torch.randn(num_heads * head_dim, hidden)
    k, v = torch.randn(num_kv_heads * head_dim, hidden), torch.randn(num_kv_heads * head_dim, hidden)
    layers = build_ranks(tp, lambda: QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, bias=False))
    for layer in layers:
        for shard_id, tensor in (("q", q), ("k", k), ("v", v)):
            layer.weight_loader(layer.weight, tensor, shard_id)
    return q, k, v, layers


def test_qkv_shards_split_query_and_kv_heads_across_ranks():
    head_dim = 2
    q, k, v, layers = _qkv(num_heads=4, num_kv_heads=2, head_dim=head_dim, tp=2)
    for rank, layer in enumerate(layers):
        assert (layer.num_heads, layer.num_kv_heads) == (2, 1)
        lq, lk, lv = layer.weight.split([2 * head_dim, head_dim, head_dim])
        assert torch.equal(lq, q[rank * 2 * head_dim:(rank + 1) * 2 * head_dim])
        assert torch.equal(lk, k[rank * head_dim:(rank + 1) * head_dim])
        assert torch.equal(lv, v[rank * head_dim:(rank + 1) * head_dim])


def test_qkv_replicates_kv_heads_when_there_are_fewer_than_ranks():
    head_dim = 2
    q, k, v, layers = _qkv(num_heads=4, num_kv_heads=2, head_dim=head_dim, tp=4)
    for rank, layer in enumerate(layers):
        assert (layer.num_heads, layer.num_kv_heads, layer.kv_replicas) == (1, 1, 2)
        lq, lk, lv = layer.weight.split([head_dim, head_dim, head_dim])
        kv_head = rank // 2  # ranks 0,1 share KV head 0; ranks 2,3 share KV head 1 (query heads 2r, 2r+1 of GQA)
        assert torch.equal(lq, q[rank * head_dim:(rank + 1) * head_dim])
        assert torch.equal(lk, k[kv_head * head_dim:(kv_head + 1) * head_dim])
        assert torch.equal(lv, v[kv_head * head_dim:(kv_head + 1) * head_dim])


def test_qkv_refuses_query_heads_that_do_not_divide():
    with tp_rank(0, 2), pytest.raises(ValueError, match="9 attention heads do not divide"):
        QKVParallelLinear(576, 64, 9, 3)


def test_row_parallel_partial_sums_add_up_to_the_full_output_with_the_bias_once():
    full_w, full_b = torch.randn(8, 12), torch.randn(8)
    layers = build_ranks(2, lambda: RowParallelLinear(12, 8, bias=True))
    for layer in layers:
        layer.weight.weight_loader(layer.weight, full_w)
        layer.bias.weight_loader(layer.bias, full_b)
    x = torch.randn(5, 12)
    partials = [layer(x[:, rank * 6:(rank + 1) * 6]) for rank, layer in enumerate(layers)]
    torch.testing.assert_close(sum(partials), F.linear(x, full_w, full_b))


def test_vocab_shards_pad_the_last_one_and_add_up_to_the_full_embedding_and_logits():
    vocab, hidden = 10, 6
    full = torch.randn(vocab, hidden)
    embeds = build_ranks(4, lambda: VocabParallelEmbedding(vocab, hidden))
    heads = build_ranks(4, lambda: ParallelLMHead(vocab, hidden))
    for layer in embeds + heads:
        layer.weight_loader(layer.weight, full)
    assert [e.weight.shape[0] for e in embeds] == [3, 3, 3, 3]
    assert torch.equal(embeds[3].weight[1:], torch.zeros(2, hidden))  # rows 10, 11 do not exist
    ids = torch.tensor([0, 4, 9, 3])
    torch.testing.assert_close(sum(e(ids) for e in embeds), F.embedding(ids, full))
    h = torch.randn(2, hidden)
    logits = torch.cat([F.linear(h, head.weight) for head in heads], dim=-1)[:, :vocab]
    torch.testing.assert_close(logits, F.linear(h, full))


# ---- layout checks before any process starts ----------------------------------------------------------------
def _config(heads=9, kv_heads=3, layers=30, intermediate=1536, **kw) -> EngineConfig:
    config = EngineConfig(model="m", **kw)
    config.hf_config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads,
                                       num_hidden_layers=layers, intermediate_size=intermediate)
    return config


def test_smollm2_heads_at_tp2_are_refused_with_the_sizes_that_work():
    with pytest.raises(ValueError, match=r"9 attention heads do not divide by --tensor-parallel-size 2; "
                                         r"use a tensor parallel size of 1, 3, 9"):
        check_parallel_config(_config(tensor_parallel_size=2))
    check_parallel_config(_config(tensor_parallel_size=3))   # 3 query heads and 1 KV head per rank
    check_parallel_config(_config(pipeline_parallel_size=2))


def test_kv_heads_that_neither_divide_nor_are_divided_are_refused():
    with pytest.raises(ValueError, match="6 KV heads"):
        check_parallel_config(_config(heads=12, kv_heads=6, tensor_parallel_size=4))


def test_node_layouts_are_checked():
    with pytest.raises(ValueError, match="spread evenly"):
        check_parallel_config(_config(pipeline_parallel_size=3, nnodes=2, master_port=1234))
    with pytest.raises(ValueError, match="--master-port"):
        check_parallel_config(_config(pipeline_parallel_size=2, nnodes=2))
    config = _config(tensor_parallel_size=3, pipeline_parallel_size=2, nnodes=2, master_port=1234)
    assert list(ranks_of_node(config, 1)) == [3, 4, 5]
    assert output_rank(config) == 3  # TP rank 0 of the last stage samples


@pytest.mark.parametrize("addr", ["127.0.0.1", "127.0.1.1", "localhost", "::1", "[::1]", "0.0.0.0"])
def test_a_loopback_master_addr_on_node_1_is_refused_in_one_sentence(addr):
    """Left at 127.0.0.1, node 1's ranks would wait for a rendezvous on their own machine until the timeout."""
    layout = dict(pipeline_parallel_size=2, nnodes=2, master_port=1234)
    with pytest.raises(ValueError) as refused:
        check_parallel_config(_config(node_rank=1, master_addr=addr, **layout))
    assert str(refused.value) == (f"--master-addr {addr} names this machine, not node 0; on node 1 pass node 0's "
                                  "network address (the same --master-addr as node 0's)")
    check_parallel_config(_config(node_rank=0, master_addr=addr, **layout))  # node 0 holds the store itself
    check_parallel_config(_config(node_rank=1, master_addr="10.0.0.1", **layout))
    check_parallel_config(_config(node_rank=1, master_addr="node0.cluster", **layout))  # names are not resolved


def test_worker_command_takes_the_server_flags_and_ignores_server_only_ones():
    args, ignored = worker_parser().parse_known_args(
        ["--model", "m", "-tp", "2", "-pp", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
         "--master-port", "29500", "--kv-cache-memory", "1GiB", "--enable-prefix-caching", "--port", "8000"])
    config = EngineConfig(**engine_config_kwargs(args))
    assert (config.tensor_parallel_size, config.pipeline_parallel_size, config.node_rank) == (2, 2, 1)
    assert (config.master_addr, config.master_port, config.kv_cache_memory) == ("10.0.0.1", 29500, 1024**3)
    assert config.enable_prefix_caching and ignored == ["--port", "8000"]


# ---- what each pipeline stage holds ---------------------------------------------------------------------------
@contextmanager
def pp_rank(rank: int, size: int):
    saved = parallel_state._TP, parallel_state._PP
    parallel_state._TP = _LocalGroup([rank], rank)
    parallel_state._PP = _LocalGroup(list(range(size)), rank)
    try:
        yield
    finally:
        parallel_state._TP, parallel_state._PP = saved


def test_only_the_first_stage_embeds_and_only_the_last_holds_the_norm_and_lm_head(monkeypatch, tiny_qwen2_dir):
    """Qwen2 ties the LM head to the embedding: the last stage, which has no embedding, loads it as its head."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from npu_infer.models.llama import Qwen2ForCausalLM
    from npu_infer.platform import init_platform
    init_platform("cpu")  # the layers ask this process's platform for their kernels
    monkeypatch.setenv("NPU_INFER_PP_LAYER_PARTITION", "1,1")
    hf = AutoConfig.from_pretrained(tiny_qwen2_dir)
    weights = load_file(tiny_qwen2_dir / "model.safetensors")
    stages = []
    for rank in range(2):
        with pp_rank(rank, 2):
            model = Qwen2ForCausalLM(hf)
            model.load_weights(weights.items())
            stages.append(model)
    first, last = stages
    assert first.model.embed_tokens is not None and first.model.norm is None and first.lm_head is None
    assert last.model.embed_tokens is None and last.model.norm is not None
    assert torch.equal(last.lm_head.weight, weights["model.embed_tokens.weight"])
    assert torch.equal(first.model.layers[0].mlp.down_proj.weight, weights["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(last.model.layers[1].mlp.down_proj.weight, weights["model.layers.1.mlp.down_proj.weight"])
    assert isinstance(first.model.layers[1], torch.nn.Identity) and isinstance(last.model.layers[0], torch.nn.Identity)
    assert {n for n, _ in first.named_parameters()}.isdisjoint({n for n, _ in last.named_parameters()})
