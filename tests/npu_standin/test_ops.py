"""Each stand-in op against an independent plain-torch reference, and calls the real op rejects must raise.

The references below are written separately from the stand-in (explicit per-sequence / per-token loops,
float64) so that a bug in the stand-in does not cancel out.
"""

from __future__ import annotations

import pytest
import torch

from . import NpuOpRejected, configure

BF16 = torch.bfloat16


# =========================================================================== references

def ref_rms_norm(x, gamma, eps):
    xd = x.double()
    return xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps) * gamma.double()


def ref_swiglu(x):
    a, b = x.double().split(x.shape[-1] // 2, dim=-1)
    return a / (1 + torch.exp(-a)) * b


def ref_rotate(x, positions, cos_sin_cache, head_size, neox):
    """x [T, heads*head_size]; rotate every head of every token one element pair at a time."""
    out = x.double().clone()
    half = head_size // 2
    for t in range(x.shape[0]):
        row = cos_sin_cache[int(positions[t])].double()
        for h in range(x.shape[1] // head_size):
            base = h * head_size
            for i in range(half):
                c, s = row[i], row[half + i]
                a_idx, b_idx = (base + i, base + half + i) if neox else (base + 2 * i, base + 2 * i + 1)
                a, b = x[t, a_idx].double(), x[t, b_idx].double()
                out[t, a_idx] = a * c - b * s
                out[t, b_idx] = b * c + a * s
    return out


def ref_attention_one(q_rows, keys, values, first_pos, scale, num_kv_heads):
    """Causal attention of query rows at positions first_pos.. over keys/values [L, KVH, D] (explicit loops)."""
    nq, nh, d = q_rows.shape
    group = nh // num_kv_heads
    out = torch.zeros(nq, nh, d, dtype=torch.float64)
    lse = torch.zeros(nq, nh, dtype=torch.float64)
    for i in range(nq):
        visible = first_pos + i + 1
        for h in range(nh):
            kvh = h // group
            scores = torch.tensor([float(q_rows[i, h].double() @ keys[j, kvh].double()) * scale
                                   for j in range(visible)], dtype=torch.float64)
            m = scores.max()
            w = torch.exp(scores - m)
            lse[i, h] = m + torch.log(w.sum())
            w = w / w.sum()
            out[i, h] = (w[:, None] * values[:visible, kvh].double()).sum(0)
    return out, lse


def make_paged(seq_lens, num_blocks, block_size, kvh, d, dtype=BF16):
    """Random caches [nb, bs, kvh, d] and shuffled block tables; returns (kc, vc, block_table, logical K/V)."""
    kc = torch.randn(num_blocks, block_size, kvh, d).to(dtype)
    vc = torch.randn(num_blocks, block_size, kvh, d).to(dtype)
    need = [-(-n // block_size) for n in seq_lens]
    perm = torch.randperm(num_blocks).tolist()
    assert sum(need) <= num_blocks
    width = max(need)
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    logical = []
    used = 0
    for b, n in enumerate(seq_lens):
        ids = perm[used:used + need[b]]
        used += need[b]
        table[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        ks = torch.stack([kc[ids[j // block_size], j % block_size] for j in range(n)])
        vs = torch.stack([vc[ids[j // block_size], j % block_size] for j in range(n)])
        logical.append((ks, vs))
    return kc, vc, table, logical


def causal_mask_2048():
    return torch.triu(torch.ones(2048, 2048), diagonal=1).to(torch.int8)


# =========================================================================== norms / swiglu

@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32])
def test_rms_norm(npu, dtype, declarations):
    x, g = torch.randn(5, 64).to(dtype), torch.randn(64).to(dtype)
    res = npu.npu_rms_norm(x, g, epsilon=1e-5)
    assert isinstance(res, tuple) and len(res) == declarations["ops"]["npu_rms_norm"]["return_arity"]
    y, rstd = res
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), ref_rms_norm(x, g, 1e-5), atol=tol, rtol=tol)
    assert y.dtype == dtype and rstd.dtype == torch.float32 and rstd.shape == (5, 1)


def test_add_rms_norm(npu, declarations):
    x1, x2, g = torch.randn(4, 32).to(BF16), torch.randn(4, 32).to(BF16), torch.randn(32).to(BF16)
    res = npu.npu_add_rms_norm(x1, x2, g)
    assert len(res) == declarations["ops"]["npu_add_rms_norm"]["return_arity"]
    y, rstd, s = res
    torch.testing.assert_close(s.double(), x1.double() + x2.double(), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(y.double(), ref_rms_norm(x1.double() + x2.double(), g, 1e-6), atol=5e-2, rtol=3e-2)
    assert rstd.shape == (4, 1)


def test_swiglu_halves_the_last_dimension_as_the_reference_does(npu, declarations):
    x = torch.randn(3, 2 * 24).to(BF16)
    y = npu.npu_swiglu(x)
    assert isinstance(y, torch.Tensor) and declarations["ops"]["npu_swiglu"]["return_arity"] == 1
    torch.testing.assert_close(y.double(), ref_swiglu(x), atol=3e-2, rtol=3e-2)
    assert y.shape == (3, 24)


def test_norm_rejections(npu):
    x = torch.randn(4, 16).to(BF16)
    with pytest.raises(NpuOpRejected, match="gamma_dtype"):
        npu.npu_rms_norm(x, torch.randn(16))  # float32 gamma with bf16 input
    with pytest.raises(NpuOpRejected, match="self_rank"):
        npu.npu_rms_norm(x[0], torch.randn(16).to(BF16))  # 1-D input
    with pytest.raises(NpuOpRejected, match="dtype"):
        npu.npu_rms_norm(torch.ones(4, 16, dtype=torch.int32), torch.ones(16, dtype=torch.int32))
    with pytest.raises(NpuOpRejected):
        npu.npu_add_rms_norm(x, torch.randn(4, 16), torch.randn(16).to(BF16))  # x2 dtype differs
    with pytest.raises(NpuOpRejected, match="formula"):
        npu.npu_swiglu(torch.randn(2, 7))  # odd split dimension
    with pytest.raises(TypeError):
        npu.npu_swiglu(x, dim=1.0)


# =========================================================================== reshape_and_cache

def test_reshape_and_cache(npu, declarations):
    nb, bs, kvh, d, T = 6, 16, 2, 32, 5
    kc, vc = torch.zeros(nb, bs, kvh, d).to(BF16), torch.zeros(nb, bs, kvh, d).to(BF16)
    k, v = torch.randn(T, kvh, d).to(BF16), torch.randn(T, kvh, d).to(BF16)
    slots = [3, 17, 40, 95, 0]
    before_k = kc.clone()
    assert npu._npu_reshape_and_cache(k, v, kc, vc, torch.tensor(slots, dtype=torch.int32)) is None
    assert declarations["ops"]["_npu_reshape_and_cache"]["return_arity"] == 0
    expect_k, expect_v = before_k.clone(), torch.zeros_like(vc)
    for t, slot in enumerate(slots):
        expect_k[slot // bs, slot % bs] = k[t]
        expect_v[slot // bs, slot % bs] = v[t]
    assert torch.equal(kc, expect_k) and torch.equal(vc, expect_v)


def test_reshape_and_cache_rejections(npu):
    nb, bs, kvh, d, T = 4, 16, 2, 32, 3
    kc, vc = torch.zeros(nb, bs, kvh, d).to(BF16), torch.zeros(nb, bs, kvh, d).to(BF16)
    k, v = torch.randn(T, kvh, d).to(BF16), torch.randn(T, kvh, d).to(BF16)
    slots = torch.tensor([1, 2, 3], dtype=torch.int32)
    with pytest.raises(NpuOpRejected, match="int32"):
        npu._npu_reshape_and_cache(k, v, kc, vc, slots.long())
    with pytest.raises(NpuOpRejected, match="layout"):  # cache as [num_blocks, kv_heads, block_size, head_size]
        npu._npu_reshape_and_cache(k, v, kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous(), slots)
    with pytest.raises(NpuOpRejected, match="not contiguous"):  # in-place output must be contiguous
        big = torch.zeros(nb, bs, kvh, 2 * d).to(BF16)
        npu._npu_reshape_and_cache(k, v, big[..., :d], vc, slots)
    with pytest.raises(NpuOpRejected, match="same_dtype"):
        npu._npu_reshape_and_cache(k.float(), v, kc, vc, slots)
    with pytest.raises(NpuOpRejected, match="slot index"):
        npu._npu_reshape_and_cache(k, v, kc, vc, torch.tensor([1, 2, nb * bs], dtype=torch.int32))
    # a strided INPUT is fine (ATB copies inputs to contiguous memory)
    kk = torch.randn(T, kvh, 2 * d).to(BF16)[..., :d]
    npu._npu_reshape_and_cache(kk, v, kc, vc, slots)
    assert torch.equal(kc[0, 1], kk[0])


# =========================================================================== paged attention (decode)

def test_paged_attention_gqa(npu):
    nh, kvh, d, bs = 8, 2, 64, 128
    ctx = [1, 130, 257]
    kc, vc, table, logical = make_paged(ctx, 8, bs, kvh, d)
    q = torch.randn(len(ctx), nh, d).to(BF16)
    out = torch.empty_like(q)
    scale = d ** -0.5
    npu._npu_paged_attention(q, kc, vc, kvh, nh, scale, table, torch.tensor(ctx, dtype=torch.int32), out)
    for b, n in enumerate(ctx):
        ks, vs = logical[b]
        ref, _ = ref_attention_one(q[b:b + 1], ks, vs, n - 1, scale, kvh)
        torch.testing.assert_close(out[b].double(), ref[0], atol=2e-2, rtol=2e-2)


def test_paged_attention_rejections(npu):
    nh, kvh, d, bs = 4, 2, 64, 128
    kc, vc, table, _ = make_paged([10, 20], 4, bs, kvh, d)
    q = torch.randn(2, nh, d).to(BF16)
    ctx = torch.tensor([10, 20], dtype=torch.int32)

    def call(**kw):
        args = dict(query=q, key_cache=kc, value_cache=vc, num_kv_heads=kvh, num_heads=nh, scale_value=0.1,
                    block_table=table, context_lens=ctx, out=torch.empty_like(q))
        args.update(kw)
        npu._npu_paged_attention(**args)

    call()
    with pytest.raises(NpuOpRejected, match="dtype"):
        call(query=q.float(), out=torch.empty_like(q.float()))
    with pytest.raises(NpuOpRejected, match="kv_head_num"):
        call(num_kv_heads=4)
    with pytest.raises(NpuOpRejected, match="kv_head_num"):  # cache in [nb, kv_heads, bs, d] layout
        call(key_cache=kc.transpose(1, 2).contiguous(), value_cache=vc.transpose(1, 2).contiguous())
    with pytest.raises(NpuOpRejected, match="context_lens_host"):
        call(context_lens=ctx.long())
    with pytest.raises(NpuOpRejected, match="not contiguous"):
        call(out=torch.empty(2, nh, 2 * d).to(BF16)[..., :d])
    big = torch.zeros(2, 512, kvh, d).to(BF16)  # block_size 512 * head_size 64 > 128*128
    with pytest.raises(NpuOpRejected, match="block_size_head_size"):
        call(key_cache=big, value_cache=big, block_table=torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(NpuOpRejected, match="outside"):
        call(context_lens=torch.tensor([10, 600], dtype=torch.int32))
    with pytest.raises(TypeError):
        call(num_heads=4.0)


# =========================================================================== rotary

@pytest.mark.parametrize("neox", [True, False])
def test_rotary_embedding_rotates_q_and_k_in_place_as_the_reference_does(npu, neox):
    T, hq, hk, d, max_pos = 4, 3, 1, 16, 50
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    freqs = torch.outer(torch.arange(max_pos).double(), inv)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(BF16)
    positions = torch.tensor([0, 7, 49, 3])
    q, k = torch.randn(T, hq * d).to(BF16), torch.randn(T, hk * d).to(BF16)
    q0, k0 = q.clone(), k.clone()
    assert npu._npu_rotary_embedding(positions, q, k, d, cache, neox) is None
    torch.testing.assert_close(q.double(), ref_rotate(q0, positions, cache, d, neox), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(k.double(), ref_rotate(k0, positions, cache, d, neox), atol=3e-2, rtol=3e-2)


def test_rotary_rejections(npu):
    T, d = 3, 16
    cache = torch.randn(20, d).to(BF16)
    pos = torch.tensor([1, 2, 3])
    q, k = torch.randn(T, 2 * d).to(BF16), torch.randn(T, d).to(BF16)
    with pytest.raises(NpuOpRejected, match="not contiguous"):  # in-place on a strided view would be lost
        qkv = torch.randn(T, 4 * d).to(BF16)
        npu._npu_rotary_embedding(pos, qkv[:, :2 * d], qkv[:, 2 * d:3 * d], d, cache, True)
    with pytest.raises(NpuOpRejected, match="cache_dtype"):
        npu._npu_rotary_embedding(pos, q, k, d, cache.float(), True)
    with pytest.raises(NpuOpRejected, match="head_size"):
        npu._npu_rotary_embedding(pos, q, k, d // 2, cache, True)
    with pytest.raises(NpuOpRejected, match="neox_tables"):
        npu._npu_rotary_embedding(torch.tensor([1, 2, 20]), q, k, d, cache, True)
    npu._npu_rotary_embedding(pos, q, k, d, cache, True)  # the first cache of the "process"
    npu._npu_rotary_embedding(pos, q, k, d, cache.clone(), True)  # equal values: fine
    with pytest.raises(NpuOpRejected, match="first_cache_wins"):
        npu._npu_rotary_embedding(pos, q, k, d, cache + 1, True)


# =========================================================================== fused infer attention (prefill)

def _fia_case(layout, nh=4, kvh=2, d=64, bs=128):
    """A chunked prefill with a cached prefix (40 new of 190) and a fresh prefill (25 of 25)."""
    q_lens, kv_lens = [40, 25], [190, 25]
    kc, vc, table, logical = make_paged(kv_lens, 6, bs, kvh, d)
    qs = [torch.randn(n, nh, d).to(BF16) for n in q_lens]
    return q_lens, kv_lens, kc, vc, table, logical, qs


def _check_against_reference(out_rows, lse_rows, q_lens, kv_lens, logical, qs, scale, kvh):
    start = 0
    for b, (nq, nk) in enumerate(zip(q_lens, kv_lens)):
        ks, vs = logical[b]
        ref, ref_lse = ref_attention_one(qs[b], ks, vs, nk - nq, scale, kvh)
        torch.testing.assert_close(out_rows[start:start + nq].double(), ref, atol=2e-2, rtol=2e-2)
        if lse_rows is not None:
            torch.testing.assert_close(lse_rows[start:start + nq].double(), ref_lse, atol=1e-3, rtol=1e-3)
        start += nq


def test_fia_tnd_paged(npu, declarations):
    nh, kvh, d, bs = 4, 2, 64, 128
    q_lens, kv_lens, kc, vc, table, logical, qs = _fia_case("TND")
    query = torch.cat(qs)
    scale = d ** -0.5
    res = npu.npu_fused_infer_attention_score(
        query, kc.view(kc.shape[0], bs, -1), vc.view(vc.shape[0], bs, -1), atten_mask=causal_mask_2048(),
        block_table=table, actual_seq_lengths=[40, 65], actual_seq_lengths_kv=kv_lens, num_heads=nh,
        num_key_value_heads=kvh, scale=scale, input_layout="TND", sparse_mode=3, block_size=bs,
        softmax_lse_flag=True)
    assert isinstance(res, tuple) and len(res) == declarations["ops"]["npu_fused_infer_attention_score"]["return_arity"]
    out, lse = res
    assert out.shape == query.shape and out.dtype == BF16 and lse.shape == (65, nh, 1) and lse.dtype == torch.float32
    _check_against_reference(out, lse[..., 0], q_lens, kv_lens, logical, qs, scale, kvh)
    # without softmax_lse_flag the second output is a [1] zero tensor (documented)
    _, lse0 = npu.npu_fused_infer_attention_score(
        query, kc.view(kc.shape[0], bs, -1), vc.view(vc.shape[0], bs, -1), atten_mask=causal_mask_2048(),
        block_table=table, actual_seq_lengths=[40, 65], actual_seq_lengths_kv=kv_lens, num_heads=nh,
        num_key_value_heads=kvh, scale=scale, input_layout="TND", sparse_mode=3, block_size=bs)
    assert lse0.shape == (1,) and float(lse0) == 0.0


def test_fia_bsh_paged_with_padding(npu):
    nh, kvh, d, bs = 4, 2, 64, 128
    q_lens, kv_lens, kc, vc, table, logical, qs = _fia_case("BSH")
    S = max(q_lens)
    query = torch.zeros(2, S, nh * d).to(BF16)
    for b, x in enumerate(qs):
        query[b, :q_lens[b]] = x.reshape(q_lens[b], -1)
    out, lse = npu.npu_fused_infer_attention_score(
        query, kc.view(kc.shape[0], bs, -1), vc.view(vc.shape[0], bs, -1), atten_mask=causal_mask_2048(),
        block_table=table, actual_seq_lengths=q_lens, actual_seq_lengths_kv=kv_lens, num_heads=nh,
        num_key_value_heads=kvh, scale=0.125, input_layout="BSH", sparse_mode=3, block_size=bs,
        softmax_lse_flag=True)
    assert out.shape == query.shape and lse.shape == (2, nh, S, 1)
    rows = torch.cat([out[b, :n].reshape(n, nh, d) for b, n in enumerate(q_lens)])
    _check_against_reference(rows, None, q_lens, kv_lens, logical, qs, 0.125, kvh)
    assert torch.isnan(out[1, q_lens[1]:].float()).all()  # padded rows are unspecified: NaN in the stand-in


def test_fia_bsh_without_page_attention(npu):
    nh, kvh, d = 4, 1, 32
    lens = [5, 9]
    q = torch.randn(2, 9, nh * d).to(BF16)
    k, v = torch.randn(2, 9, kvh * d).to(BF16), torch.randn(2, 9, kvh * d).to(BF16)
    out, _ = npu.npu_fused_infer_attention_score(
        q, k, v, atten_mask=causal_mask_2048(), actual_seq_lengths=lens, actual_seq_lengths_kv=lens,
        num_heads=nh, num_key_value_heads=kvh, scale=0.2, input_layout="BSH", sparse_mode=3)
    for b, n in enumerate(lens):
        ref, _ = ref_attention_one(q[b, :n].view(n, nh, d), k[b, :n].view(n, kvh, d), v[b, :n].view(n, kvh, d),
                                   0, 0.2, kvh)
        torch.testing.assert_close(out[b, :n].view(n, nh, d).double(), ref, atol=2e-2, rtol=2e-2)


def test_fia_rejections(npu):
    nh, kvh, d, bs = 4, 2, 64, 128
    q_lens, kv_lens, kc, vc, table, _, qs = _fia_case("TND")
    query = torch.cat(qs)
    k3, v3 = kc.view(kc.shape[0], bs, -1), vc.view(vc.shape[0], bs, -1)

    def call(**kw):
        args = dict(atten_mask=causal_mask_2048(), block_table=table, actual_seq_lengths=[40, 65],
                    actual_seq_lengths_kv=kv_lens, num_heads=nh, num_key_value_heads=kvh, scale=0.1,
                    input_layout="TND", sparse_mode=3, block_size=bs)
        q, k, v = kw.pop("query", query), kw.pop("key", k3), kw.pop("value", v3)
        args.update(kw)
        return npu.npu_fused_infer_attention_score(q, k, v, **args)

    call()
    with pytest.raises(NpuOpRejected, match="query_dtype_contiguous"):
        call(query=query.float(), key=k3.float(), value=v3.float())
    with pytest.raises(NpuOpRejected, match="query_dtype_contiguous"):
        call(query=torch.cat([query, query], dim=-1)[..., :d])  # non-contiguous query
    with pytest.raises(NpuOpRejected, match="pa_kv_layouts"):  # [nb, bs, kvh, d] read as (nb, KV_N, bs, D)
        call(key=kc, value=vc)
    with pytest.raises(NpuOpRejected, match="pa_kv_layouts"):  # 4-D cache with a BSH query
        call(query=query.view(1, 65, nh * d), key=kc.permute(0, 2, 1, 3).contiguous(),
             value=vc.permute(0, 2, 1, 3).contiguous(), input_layout="BSH", actual_seq_lengths=[65],
             block_table=table[:1], actual_seq_lengths_kv=[190])
    with pytest.raises(NpuOpRejected, match="pa_block_size_qs_gt1"):  # 64-token blocks with prefills
        call(key=k3.reshape(-1, 64, kvh * d), value=v3.reshape(-1, 64, kvh * d), block_size=64,
             block_table=torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32))
    with pytest.raises(NpuOpRejected, match="pa_requires_kv_lengths"):
        call(actual_seq_lengths_kv=None)
    with pytest.raises(NpuOpRejected, match="actual_seq_lengths"):  # per-sequence lengths instead of cumulative
        call(actual_seq_lengths=q_lens)
    with pytest.raises(NpuOpRejected, match="sparse_mode_234_mask"):  # lower triangle = the wrong convention
        call(atten_mask=torch.tril(torch.ones(2048, 2048), diagonal=-1).to(torch.int8))
    with pytest.raises(NpuOpRejected, match="atten_mask_sparse_234_shape"):
        call(atten_mask=torch.triu(torch.ones(512, 512), diagonal=1).to(torch.int8))
    with pytest.raises(NpuOpRejected, match="atten_mask_dtype"):
        call(atten_mask=torch.triu(torch.ones(2048, 2048), diagonal=1))  # float mask
    with pytest.raises(NpuOpRejected, match="block_table_dtype"):
        call(block_table=table.long())
    with pytest.raises(NpuOpRejected, match="sparse_mode_values"):
        call(sparse_mode=5)
    with pytest.raises(NpuOpRejected, match="num_heads"):
        call(num_heads=8)
    with pytest.raises(NpuOpRejected, match="num_key_value_heads"):
        call(num_key_value_heads=3)
    with pytest.raises(NpuOpRejected, match="rows"):  # more query rows than context under rightDownCausal
        call(actual_seq_lengths_kv=[30, 25])
    with pytest.raises(NpuOpRejected, match="input_layouts_a2"):
        call(input_layout="THD")
    with pytest.raises(TypeError, match="list"):
        call(actual_seq_lengths_kv=torch.tensor(kv_lens))
    with pytest.raises(TypeError):
        call(block_size="128")
    configure(tnd_paged=False)  # strict reading: TND without page attention only
    with pytest.raises(NpuOpRejected, match="input_layouts_a2"):
        call()


def test_fia_tnd_without_paging_follows_the_tnd_limits(npu):
    q = torch.randn(10, 4, 64).to(BF16)
    with pytest.raises(NpuOpRejected, match="tnd_"):
        npu.npu_fused_infer_attention_score(q, q, q, actual_seq_lengths=[10], actual_seq_lengths_kv=[10],
                                            num_heads=4, input_layout="TND")
