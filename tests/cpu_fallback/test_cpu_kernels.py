"""The AVX-512 CPU kernels (npu_infer/platform/cpu_kernels.cpp) against their plain-torch twins, op by op.

fp32 must agree to fp32 rounding; bf16 to one bf16 rounding step (the kernels round once where torch rounds
some intermediates too). Skipped only on a CPU without AVX-512 BF16; where the CPU has it, the build must work."""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_has_kernel_flags
from npu_infer.platform import cpu_kernels
from npu_infer.platform.torch_attention import TorchAttentionBackend
from npu_infer.platform.torch_ops import TorchOps
from npu_infer.worker.context import AttentionMetadata

HAS_FLAGS = cpu_has_kernel_flags()
pytestmark = pytest.mark.skipif(not HAS_FLAGS, reason="this CPU lacks AVX-512 BF16: the kernels are never used here")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def kernels():
    return cpu_kernels.load()


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # one bf16 step (2^-8 relative) of the larger magnitude
        scale = want.float().abs().amax().clamp(min=1.0).item()
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7 * scale)


def test_kernels_build_where_the_cpu_can_run_them(kernels):
    assert kernels is not None, "the CPU has AVX-512 BF16 but the kernels did not build: see the warning logged"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 100), (33, 64)])
def test_rms_norm_and_residual_add(kernels, dtype, rows, hidden):
    from npu_infer.platform.cpu_ops import CpuOps
    g = torch.Generator().manual_seed(rows)
    x, residual = (torch.randn(rows, hidden, generator=g).to(dtype) for _ in range(2))
    weight = torch.randn(hidden, generator=g).to(dtype)
    assert_matches(CpuOps(kernels).rms_norm(x, weight, 1e-6), TorchOps().rms_norm(x, weight, 1e-6), dtype)
    want, want_residual = TorchOps().add_rms_norm(x, residual.clone(), weight, 1e-6)
    mine = residual.clone()
    got, got_residual = CpuOps(kernels).add_rms_norm(x, mine, weight, 1e-6)
    assert got_residual.data_ptr() == mine.data_ptr()  # updated in place
    torch.testing.assert_close(got_residual, want_residual, rtol=0, atol=0)  # one rounding on both sides
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 1536), (5, 40)])
def test_silu_and_mul(kernels, dtype, rows, inter):
    from npu_infer.platform.cpu_ops import CpuOps
    x = (torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    assert_matches(CpuOps(kernels).silu_and_mul(x), TorchOps().silu_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 80)])
def test_rotary_in_place_on_fused_qkv(kernels, dtype, heads, kv_heads, head_dim):
    from npu_infer.models.layers.rotary import RotaryEmbedding
    from npu_infer.platform import init_platform
    from npu_infer.platform.cpu_ops import CpuOps
    init_platform("cpu")  # the layer asks the platform for its ops when it is built
    table = RotaryEmbedding(head_dim, 4096, 10000.0).cos_sin_cache
    positions = torch.tensor([0, 1, 17, 900, 4095])
    qkv = torch.randn(5, (heads + 2 * kv_heads) * head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    torch_ops, cpu_ops = TorchOps(), CpuOps(kernels)
    q_want, k_want = torch_ops.rotary(*qkv.clone().split(sizes, -1)[:2],
                                      torch_ops.rope_step(positions, table, head_dim, dtype))
    mine = qkv.clone()
    q, k, v = mine.split(sizes, -1)
    q_got, k_got = cpu_ops.rotary(q, k, cpu_ops.rope_step(positions, table, head_dim, dtype))
    assert q_got.data_ptr() == mine.data_ptr()  # rotated where it lay
    assert_matches(q_got, q_want, dtype)
    assert_matches(k_got, k_want, dtype)
    assert torch.equal(v, qkv.split(sizes, -1)[2])  # v untouched


def test_rotary_refuses_a_position_past_its_table(kernels):
    qkv = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="outside the table"):
        kernels.rotary_(qkv, torch.tensor([64]), torch.randn(64, 64), 2, 64)


def _attend(backend, q, k, v, cache, meta, scale, heads, kv_heads, head_dim):
    """One layer's attention over one step, as the model runner and a layer do it."""
    impl = backend.make_impl(heads, head_dim, scale, kv_heads)
    return impl.forward(q, k, v, cache, backend.build_metadata(meta))


def _paged_case(batch_lens: list[int], kv_heads: int, head_dim: int, dtype, block_size=16, num_blocks=64, seed=0):
    """A random cache with shuffled block tables, and one new token per sequence (decode)."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(-(-n // block_size) for n in batch_lens)
    tables = torch.zeros(len(batch_lens), max_blocks, dtype=torch.int32)
    slots = []
    for i, n in enumerate(batch_lens):
        ids = [order.pop() for _ in range(-(-n // block_size))]
        tables[i, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        slots.append(ids[(n - 1) // block_size] * block_size + (n - 1) % block_size)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.arange(len(batch_lens) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(batch_lens, dtype=torch.int32), block_tables=tables,
        query_lens_cpu=[1] * len(batch_lens), seq_lens_cpu=list(batch_lens), num_decodes=len(batch_lens),
        num_decode_tokens=len(batch_lens), max_query_len=1, max_seq_len=max(batch_lens), block_size=block_size)
    return cache, meta, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,heads,kv_heads,head_dim", [
    ([1, 16, 17, 100], 9, 3, 64),   # SmolLM2's heads; lengths at and across block edges
    ([40], 4, 4, 128),              # no GQA, batch 1
    ([5, 33, 64, 2, 80, 47, 9, 16, 31, 70], 16, 1, 32),  # 16 query heads per KV head (two groups of 8), 10 seqs
])
def test_decode_attention_and_cache_write_equal_the_torch_path(kernels, dtype, lens, heads, kv_heads, head_dim):
    from npu_infer.platform.cpu_attention import CpuAttentionBackend
    cache, meta, g = _paged_case(lens, kv_heads, head_dim, dtype)
    qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    scale = head_dim ** -0.5
    want_cache, got_cache = cache.clone(), cache.clone()
    want = _attend(TorchAttentionBackend(), q, k, v, want_cache, meta, scale, heads, kv_heads, head_dim)
    got = _attend(CpuAttentionBackend(kernels), q, k, v, got_cache, meta, scale, heads, kv_heads, head_dim)
    assert torch.equal(got_cache, want_cache)  # the same slots written, nothing else touched
    assert_matches(got, want, dtype)


def _mixed_step(steps: list[tuple[int, int]], kv_heads: int, head_dim: int, dtype, block_size=16, num_blocks=96,
                seed=0):
    """A paged case for one step of (query_len, seq_len) per sequence, decodes first as the scheduler orders them:
    the cache holds random context, the step's new tokens go to the last query_len positions of each sequence."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(-(-n // block_size) for _, n in steps)
    tables = torch.zeros(len(steps), max_blocks, dtype=torch.int32)
    slots = []
    for i, (q_len, n) in enumerate(steps):
        ids = [order.pop() for _ in range(-(-n // block_size))]
        tables[i, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        slots += [ids[p // block_size] * block_size + p % block_size for p in range(n - q_len, n)]
    q_lens = [q for q, _ in steps]
    num_decodes = next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32),
        seq_lens=torch.tensor([n for _, n in steps], dtype=torch.int32), block_tables=tables,
        query_lens_cpu=q_lens, seq_lens_cpu=[n for _, n in steps], num_decodes=num_decodes,
        num_decode_tokens=num_decodes, max_query_len=max(q_lens), max_seq_len=max(n for _, n in steps),
        block_size=block_size)
    return cache, meta, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps,heads,kv_heads,head_dim", [
    # decodes; fresh prefills (one of a block and a row, equal-length ones the twin batches); a chunked prefill and
    # a prefix-cache hit (context from the cache); rows at and across block edges
    ([(1, 17), (1, 40), (37, 37), (16, 16), (16, 16), (13, 50), (5, 33)], 9, 3, 64),
    ([(70, 70)], 4, 4, 128),                     # one long prompt, no GQA: rows spread over both threads
    ([(1, 5), (9, 9), (3, 30)], 16, 2, 32),      # 8 query heads per KV head
])
def test_paged_attention_mixed_step_equals_the_torch_path(kernels, dtype, steps, heads, kv_heads, head_dim):
    """One call for the whole step (decodes, prefills, chunked prefills) against the twin's per-phase SDPA."""
    from npu_infer.platform.cpu_attention import CpuAttentionBackend
    cache, meta, g = _mixed_step(steps, kv_heads, head_dim, dtype)
    tokens = sum(q for q, _ in steps)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    scale = head_dim ** -0.5
    want_cache, got_cache = cache.clone(), cache.clone()
    want = _attend(TorchAttentionBackend(), q, k, v, want_cache, meta, scale, heads, kv_heads, head_dim)
    got = _attend(CpuAttentionBackend(kernels), q, k, v, got_cache, meta, scale, heads, kv_heads, head_dim)
    assert torch.equal(got_cache, want_cache)
    assert_matches(got, want, dtype)


def test_paged_attention_refuses_rows_that_do_not_add_up(kernels):
    cache, meta, _ = _mixed_step([(1, 20), (4, 9)], 2, 64, torch.float32)
    q = torch.randn(5, 4, 64)
    args = (cache, meta.block_tables)
    with pytest.raises(RuntimeError, match=r"paged_attention: query_start_loc must run from 0 to q's 6 rows, got 0\.\.5"):
        kernels.paged_attention(torch.randn(6, 4, 64), *args, meta.query_start_loc, meta.seq_lens, 0.1)
    with pytest.raises(RuntimeError, match=r"paged_attention: sequence 1 has 4 query rows \(query_start_loc\); it must "
                                           r"have 1\.\.seq_lens\[1\] = 3"):
        kernels.paged_attention(q, *args, meta.query_start_loc, torch.tensor([20, 3], dtype=torch.int32), 0.1)
    with pytest.raises(RuntimeError, match=r"paged_attention: query_start_loc must be contiguous \[3\]"):
        kernels.paged_attention(q, *args, meta.query_start_loc[:2], meta.seq_lens, 0.1)
    with pytest.raises(RuntimeError, match=r"paged_attention: sequence 0 has 0 query rows"):
        kernels.paged_attention(q, *args, torch.tensor([0, 0, 5], dtype=torch.int32), meta.seq_lens, 0.1)


def test_decode_attention_refuses_what_it_cannot_read(kernels):
    cache, meta, _ = _paged_case([20], 2, 64, torch.float32)
    q = torch.randn(1, 4, 64)
    with pytest.raises(RuntimeError, match=r"seq_lens\[0\] = 33 must be in 1\.\.32"):  # longer than its block table
        kernels.decode_attention(q, cache, meta.block_tables, torch.tensor([33], dtype=torch.int32), 0.1)
    with pytest.raises(RuntimeError, match="q must be bfloat16 or float32"):
        kernels.decode_attention(q.half(), cache.half(), meta.block_tables, meta.seq_lens, 0.1)


def _decode_step(batch_lens: list[int], heads=4, kv_heads=2, head_dim=64):
    """One decode step's q, k, v rows [B, heads * D] and its paged case (fp32)."""
    cache, meta, g = _paged_case(batch_lens, kv_heads, head_dim, torch.float32)
    qkv = torch.randn(len(batch_lens), (heads + 2 * kv_heads) * head_dim, generator=g)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    return q, k, v, cache, meta


@pytest.mark.parametrize("bad", [64 * 16, 10 ** 9, -1])  # one past the cache's last slot, far past, negative
def test_a_slot_outside_the_cache_raises_on_both_paths_and_the_kernel_writes_nothing(kernels, bad):
    """A bad slot id must raise as the torch twin's index_copy_ does (IndexError), never write out of bounds; the
    kernel checks every slot first, so the cache is left as it was (the twin may have written the good ones)."""
    from npu_infer.platform.cpu_attention import CpuAttentionBackend
    q, k, v, cache, meta = _decode_step([20, 5])
    meta = dataclasses.replace(meta, slot_mapping=torch.tensor([meta.slot_mapping[0].item(), bad]))
    args = (meta, 0.125, 4, 2, 64)
    with pytest.raises(IndexError):
        _attend(TorchAttentionBackend(), q, k, v, cache.clone(), *args)
    got = cache.clone()
    with pytest.raises(IndexError, match=rf"cache_write: slots\[1\] = {bad} is outside the cache's 1024 slots"):
        _attend(CpuAttentionBackend(kernels), q, k, v, got, *args)
    assert torch.equal(got, cache)


@pytest.mark.parametrize("bad", [64, -1])  # the cache has blocks 0..63
def test_a_block_id_outside_the_cache_raises_on_both_paths(kernels, bad):
    """A bad block id in a sequence's table must raise as the torch twin's block gather does, never read out of
    bounds: the kernel names the entry (IndexError), the twin's index_select raises its own error."""
    from npu_infer.platform.cpu_attention import CpuAttentionBackend
    q, k, v, cache, meta = _decode_step([20, 5])
    tables = meta.block_tables.clone()
    tables[0, 1] = bad  # sequence 0 (20 tokens) reads its second block
    meta = dataclasses.replace(meta, block_tables=tables)
    args = (meta, 0.125, 4, 2, 64)
    with pytest.raises((IndexError, RuntimeError)):
        _attend(TorchAttentionBackend(), q, k, v, cache.clone(), *args)
    with pytest.raises(IndexError, match=rf"paged_attention: block_tables\[0, 1\] = {bad} is outside the cache's 64 "):
        _attend(CpuAttentionBackend(kernels), q, k, v, cache.clone(), *args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,words", [(49152, 1536), (49157, 1537), (49200, 1536), (40, 1)])
def test_bitmask_ban_equals_xgrammar_and_the_torch_path(kernels, dtype, vocab, words):
    """Rows of the mask go to the given logits rows; bits past the vocabulary are ignored and tokens past the
    mask's bits banned (a padded vocabulary); untouched rows stay as they were."""
    import numpy as np
    import xgrammar as xgr
    from npu_infer.platform.cpu_ops import CpuOps
    rng = np.random.default_rng(vocab)
    bitmask = torch.from_numpy(rng.integers(-2 ** 31, 2 ** 31, size=(3, words), dtype=np.int32))
    bitmask[0] = -1  # all allowed
    rows = [4, 0, 2]
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    got, twin = logits.clone(), logits.clone()
    CpuOps(kernels).ban_by_bitmask_(got, bitmask, rows)
    TorchOps().ban_by_bitmask_(twin, bitmask, rows)
    want = logits.float().clone()
    full = torch.zeros(5, max(words, (vocab + 31) // 32), dtype=torch.int32)  # xgrammar: rows with no mask
    full[:] = -1
    full[rows, :words] = bitmask
    xgr.apply_token_bitmask_inplace(want, full[:, :(vocab + 31) // 32], vocab_size=min(vocab, 32 * words))
    want[:, 32 * words:] = float("-inf")
    want[[1, 3]] = logits[[1, 3]].float()
    assert torch.equal(got.float(), want) and torch.equal(twin, got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(64, 49152), (3, 49157), (1, 7)])
def test_argmax_rows_equals_torch_argmax_ties_nans_and_banned_rows_included(kernels, dtype, rows, vocab):
    """Greedy sampling's argmax: torch's answer on every row, the first index on ties, a row holding a NaN (torch
    calls NaN the maximum), a row banned to -inf everywhere, +inf and a maximum in the vector loop's tail."""
    from npu_infer.platform.cpu_ops import CpuOps
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    logits[0, vocab // 3] = logits[0, vocab // 2] = 50.0  # a tie: the first one wins
    if rows > 2:
        logits[1] = float("-inf")
        logits[1, vocab - 1] = float("-inf")
        logits[2, vocab - 1] = 60.0  # in the tail of the last 16-lane load
    if rows > 3:
        logits[3, 5] = float("nan")
        logits[4, 100] = float("inf")
        logits[5, [7, 9]] = float("inf")
    wide = torch.zeros(rows, vocab + 3, dtype=dtype)  # rows not packed back to back
    wide[:, :vocab] = logits
    for x in (logits, wide[:, :vocab]):
        got = CpuOps(kernels).argmax_rows(x)
        assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))
    tokens, has_nan = kernels.argmax_rows(logits)
    assert has_nan.tolist() == [rows > 3 and r == 3 for r in range(rows)]


def test_argmax_rows_in_the_sampler_is_the_platform_kernel(kernels, monkeypatch):
    """Greedy rows of sample() go through the platform's argmax (the CPU kernel here), random rows do not."""
    from npu_infer.platform.cpu_ops import CpuOps
    from npu_infer.sampling import SamplerRow, SamplingParams, sample
    calls = []
    ops = CpuOps(kernels)
    monkeypatch.setattr(kernels, "argmax_rows", lambda x, _f=kernels.argmax_rows: calls.append(x.shape) or _f(x),
                        raising=False)
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    rows = [SamplerRow(SamplingParams(temperature=0.0), None, [1], []) for _ in range(4)]
    assert sample(logits, rows, ops).token_ids == logits.argmax(dim=-1).tolist()
    assert calls == [(4, 300)]


def test_bitmask_ban_refuses_a_row_outside_the_logits(kernels):
    logits = torch.zeros(2, 64)
    with pytest.raises(RuntimeError, match=r"rows\[0\] = 2 is outside the 2 rows"):
        kernels.ban_by_bitmask_(logits, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([2]))
    assert torch.equal(logits, torch.zeros(2, 64))


def test_kernels_name_the_argument_that_is_wrong(kernels):
    """Each refusal says which argument is wrong and what it must be (it said "bad arguments")."""
    cache = torch.zeros(2, 2, 4, 16, 64)
    k, slots = torch.randn(2, 128), torch.tensor([1, 2])
    tables, lens = torch.zeros(1, 2, dtype=torch.int32), torch.tensor([20], dtype=torch.int32)
    packed = kernels.pack_linear(torch.randn(64, 128))
    cases = [
        (lambda: kernels.cache_write(k, k[:, :64], cache, slots), "cache_write: v must have kv_heads \\* head_dim = 128"),
        (lambda: kernels.cache_write(k, k, cache, slots.int()), "cache_write: slots must be int64, got Int"),
        (lambda: kernels.cache_write(k, k, cache, slots[:1]), "cache_write: slots must be contiguous \\[2\\]"),
        (lambda: kernels.cache_write(k, k, cache[:, :, :2], slots), "cache_write: cache must be contiguous"),
        (lambda: kernels.cache_write(k.bfloat16(), k, cache, slots), "cache_write: k must have cache's dtype Float"),
        (lambda: kernels.decode_attention(torch.randn(1, 4, 32), cache, tables, lens, 0.1),
         "decode_attention: cache must have q's head_dim 32, got 64"),
        (lambda: kernels.decode_attention(torch.randn(1, 3, 64), cache, tables, lens, 0.1),
         "decode_attention: q's 3 heads must be a multiple of the cache's 2 KV heads"),
        (lambda: kernels.decode_attention(torch.randn(1, 4, 64), cache, tables.long(), lens, 0.1),
         "decode_attention: block_tables must be int32"),
        (lambda: kernels.decode_attention(torch.randn(2, 4, 64), cache, tables, lens, 0.1),
         "decode_attention: block_tables must be int32 \\[2, max_blocks\\]"),
        (lambda: kernels.rms_norm(k, None, torch.ones(64), 1e-6), "rms_norm: weight must be contiguous \\[128\\]"),
        (lambda: kernels.rms_norm(k, k[:1], torch.ones(128), 1e-6), "rms_norm: residual must be x's shape"),
        (lambda: kernels.silu_and_mul(torch.randn(2, 3)), "silu_and_mul: x must have an even number of columns"),
        (lambda: kernels.rotary_(k, torch.tensor([0]), torch.randn(8, 64), 2, 64),
         "rotary_: positions must be contiguous \\[2\\]"),
        (lambda: kernels.linear_packed(torch.randn(1, 64), packed, 64, None), "linear_packed: x must be contiguous \\[M, 128\\]"),
        (lambda: kernels.linear_packed(torch.randn(1, 128), packed, 64, torch.zeros(3)),
         "linear_packed: bias must be contiguous \\[64\\]"),
        (lambda: kernels.StackLinear("w4a4", packed, 64, None), 'StackLinear: scheme must be "", "w8a8", "w8a16" or "w4a16"'),
        (lambda: kernels.StackLinear("w8a16", packed, 64, None), "StackLinear: scheme w8a16 needs scale"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(960, 576), (100, 34), (64, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_equals_f_linear(kernels, dtype, n, k, bias):
    """The packed dot-product kernel up to GEMV_MAX_ROWS rows, and the library GEMM above (oneDNN for bf16, MKL
    for fp32), against F.linear computed in fp32."""
    from npu_infer.platform.cpu_linear import GEMV_MAX_ROWS, CpuPackedLinear
    g = torch.Generator().manual_seed(n + k)
    weight = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    layer = CpuPackedLinear(weight, kernels)
    for rows in (1, 2, 3, 4, 5, 7, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1):
        x = torch.randn(rows, k, generator=g).to(dtype)
        want = F.linear(x.float(), weight.float(), None if b is None else b.float())
        got = layer(x, b)
        assert got.dtype == dtype and got.shape == (rows, n)
        assert_matches(got, want, dtype)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_engine_through_the_kernels_is_as_accurate_as_plain_torch(arch, tiny_llama_dir, tiny_qwen2_dir):
    """bf16 end to end, prompt prefilled 8 tokens a step (so the linears take the decode GEMV): our prompt
    logprobs against transformers' fp32 forward, with the kernels and without; the kernels may not be less exact."""
    from transformers import AutoModelForCausalLM

    from conftest import set_cpu_kernels
    from npu_infer import LLM, SamplingParams
    model_dir = tiny_llama_dir if arch == "llama" else tiny_qwen2_dir
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(torch.tensor([prompt]))
    ref_logprobs = ref.logits[0].log_softmax(-1)
    errors = {}
    for path in ("cpu-kernels", "plain-torch"):
        set_cpu_kernels(path == "cpu-kernels")
        try:
            llm = LLM(str(model_dir), device="cpu", dtype="bfloat16", kv_cache_memory="8MiB", skip_tokenizer_init=True,
                      max_model_len=256, max_num_batched_tokens=8, max_num_seqs=4)
            out = llm.generate([{"prompt_token_ids": prompt}],
                               SamplingParams(max_tokens=1, prompt_logprobs=3, temperature=0))[0]
        finally:
            set_cpu_kernels(True)
        errors[path] = max(abs(lp.logprob - ref_logprobs[pos - 1, token].item())
                           for pos in range(1, len(prompt)) for token, lp in out.prompt_logprobs[pos].items())
    assert errors["plain-torch"] < 0.15, errors  # bf16 noise on a random model
    assert errors["cpu-kernels"] <= 1.5 * errors["plain-torch"] + 0.01, errors


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_stack_gives_the_python_layers_bits(arch, dtype, tiny_llama_dir, tiny_qwen2_dir, monkeypatch):
    """Pure decode steps in one C++ call (DecodeStack) against the Python layers making the same kernel calls:
    the same tokens and bit-identical logprobs, and the stack really ran every decode step."""
    from npu_infer import LLM, SamplingParams
    import npu_infer.platform as platform
    model_dir = tiny_llama_dir if arch == "llama" else tiny_qwen2_dir
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    results, calls = {}, []
    for stack in ("1", "0"):
        monkeypatch.setenv("NPU_INFER_CPU_DECODE_STACK", stack)
        platform._current = None
        llm = LLM(str(model_dir), device="cpu", dtype=dtype, kv_cache_memory="8MiB", skip_tokenizer_init=True,
                  max_model_len=256)
        fused = llm.engine.executor.worker.model.model.platform_decode
        assert (fused is not None) == (stack == "1")
        if fused is not None:
            run = fused.stack.forward
            fused.stack = type("Counting", (), {"forward": lambda self, *a: calls.append(1) or run(*a)})()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        results[stack] = [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()}
                                                     for step in o.outputs[0].logprobs]) for o in outs]
    assert len(calls) == 11  # one prefill step, then 11 decode steps of all three sequences
    assert results["1"] == results["0"]


def test_lm_head_logits_come_out_in_fp32(kernels):
    """The LM head keeps the fp32 accumulator for any number of rows: logits equal fp32 math, not bf16 steps."""
    from npu_infer.platform.cpu_linear import GEMV_MAX_ROWS, CpuPackedLinear
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(1000, 64, generator=g) * 2).bfloat16()
    head = CpuPackedLinear(weight, kernels, logits=True)
    for rows in (1, GEMV_MAX_ROWS + 5):
        x = torch.randn(rows, 64, generator=g).bfloat16()
        got = head(x, None)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, F.linear(x.float(), weight.float()), rtol=1e-5, atol=1e-4)


def test_a_build_lock_left_by_a_killed_process_does_not_hang_loading(kernels, tmp_path):
    """torch's loader takes a lock file on every load; one killed while holding it used to hang every later
    start. A finished build is imported without the lock, and a stale lock is removed (in a fresh process)."""
    import os
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path
    built = Path(kernels.__file__)
    copy = tmp_path / built.parent.name
    copy.mkdir()
    shutil.copy(built, copy / built.name)
    lock = copy / "lock"
    lock.touch()
    old = time.time() - 2 * cpu_kernels.STALE_LOCK_S
    os.utime(lock, (old, old))
    code = "from npu_infer.platform import cpu_kernels; m = cpu_kernels.load(); print(m is not None and m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert out.stdout.strip() == str(copy / built.name), out.stderr[-2000:]
    assert not lock.exists()


def test_the_kernel_backend_is_chosen_only_for_what_its_kernels_take(kernels):
    """Other head sizes and dtypes get the plain-torch backend whole: the kernel backend's step metadata has
    nothing for the torch decode path to gather with."""
    from npu_infer.platform.cpu import CpuPlatform
    from npu_infer.platform.cpu_attention import CpuAttentionBackend
    platform = CpuPlatform()
    assert type(platform.attention_backend(64, torch.bfloat16)) is CpuAttentionBackend
    assert type(platform.attention_backend(128, torch.float32)) is CpuAttentionBackend
    assert type(platform.attention_backend(80, torch.bfloat16)) is TorchAttentionBackend
    assert type(platform.attention_backend(64, torch.float16)) is TorchAttentionBackend
