"""NpuAttentionBackend (its per-step metadata, its per-layer impls) and NpuFusedOps on the torch_npu stand-in,
against plain-torch references.

The mixed batch: 2 decodes, 1 chunked prefill with a cached prefix, 1 fresh prefill; GQA; bf16.
"""

from __future__ import annotations

import pytest
import torch

from npu_infer.worker.context import AttentionMetadata

from . import NpuOpRejected, calls, configure, set_device_count, set_memory

BF16 = torch.bfloat16
NH, KVH, D, BS = 8, 2, 64, 128


# =========================================================================== reference + batch builder

def ref_causal(q, k, v, first_pos, scale):
    """q [nq, NH, D] at positions first_pos.., k/v [L, KVH, D]; float64 softmax(QK^T)V, one head at a time."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    pos = torch.arange(first_pos, first_pos + q.shape[0])
    allowed = torch.arange(k.shape[0])[None, :] <= pos[:, None]
    for h in range(q.shape[1]):
        kk, vv = k[:, h // group].double(), v[:, h // group].double()
        scores = (q[:, h].double() @ kk.T) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        w = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
        out[:, h] = (w / w.sum(-1, keepdim=True)) @ vv
    return out


class Batch:
    """Sequences given as (cached tokens, new tokens); builds cache, metadata, q/k/v and the reference."""

    def __init__(self, seqs, num_blocks=16, with_cache=True):
        self.seqs = seqs
        lens = [c + n for c, n in seqs]
        need = [-(-n // BS) for n in lens]
        perm = torch.randperm(num_blocks).tolist()
        self.tables, used = [], 0
        for n in need:
            self.tables.append(perm[used:used + n])
            used += n
        width = max(need)
        block_tables = torch.zeros(len(seqs), width, dtype=torch.int32)
        for b, ids in enumerate(self.tables):
            block_tables[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        # the whole context of every sequence; the cached part goes into the cache now
        self.k_all = [torch.randn(n, KVH, D).to(BF16) for n in lens]
        self.v_all = [torch.randn(n, KVH, D).to(BF16) for n in lens]
        self.kv_cache = torch.zeros(2, num_blocks, BS, KVH, D, dtype=BF16) if with_cache else torch.empty(0)
        slots = []
        for b, (cached, new) in enumerate(seqs):
            for pos in range(cached + new):
                slot = self.tables[b][pos // BS] * BS + pos % BS
                if pos < cached:
                    self.kv_cache[0].view(-1, KVH, D)[slot] = self.k_all[b][pos]
                    self.kv_cache[1].view(-1, KVH, D)[slot] = self.v_all[b][pos]
                else:
                    slots.append(slot)
        q_lens = [n for _, n in seqs]
        T = sum(q_lens)
        num_decodes = sum(1 for c, n in seqs if n == 1 and c > 0)
        self.meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=block_tables, query_lens_cpu=q_lens,
            seq_lens_cpu=lens, num_decodes=num_decodes, num_decode_tokens=num_decodes, max_query_len=max(q_lens),
            max_seq_len=max(lens), block_size=BS)
        # q, k, v as the model produces them: strided views of one fused projection output
        q_new = torch.randn(T, NH * D).to(BF16)
        k_new = torch.cat([self.k_all[b][c:] for b, (c, _) in enumerate(seqs)]).reshape(T, KVH * D)
        v_new = torch.cat([self.v_all[b][c:] for b, (c, _) in enumerate(seqs)]).reshape(T, KVH * D)
        qkv = torch.cat([q_new, k_new, v_new], dim=-1)
        self.q, self.k, self.v = qkv.split([NH * D, KVH * D, KVH * D], dim=-1)
        self.scale = D ** -0.5

    def reference(self):
        outs, start = [], 0
        for b, (cached, new) in enumerate(self.seqs):
            q = self.q[start:start + new].reshape(new, NH, D)
            outs.append(ref_causal(q, self.k_all[b], self.v_all[b], cached, self.scale).reshape(new, NH * D))
            start += new
        return torch.cat(outs)

    def run(self, backend):
        """One layer's attention over this step, as the model runner and a layer do it."""
        impl = backend.make_impl(NH, D, self.scale, KVH)
        return impl.forward(self.q, self.k, self.v, self.kv_cache, backend.build_metadata(self.meta))


MIXED = [(130, 1), (6, 1), (150, 40), (0, 25)]  # 2 decodes, chunked prefill over a cached prefix, fresh prefill


@pytest.fixture
def backend(npu):
    from npu_infer.platform.npu_attention import NpuAttentionBackend
    return NpuAttentionBackend(D)


# =========================================================================== attention backend

def test_mixed_batch_matches_reference(backend):
    batch = Batch(MIXED)
    assert not batch.q.is_contiguous() and not batch.k.is_contiguous()
    out = batch.run(backend)
    assert out.shape == (sum(n for _, n in MIXED), NH * D) and out.dtype == BF16
    torch.testing.assert_close(out.double(), batch.reference(), atol=2e-2, rtol=2e-2)
    # the new tokens' K/V are in the cache at their slots
    flat_k = batch.kv_cache[0].view(-1, KVH, D)
    torch.testing.assert_close(flat_k[batch.meta.slot_mapping], batch.k.reshape(-1, KVH, D), atol=0, rtol=0)


def test_under_inference_mode(backend, ops):
    """The model runner works in torch.inference_mode(): inference tensors have no version counter."""
    with torch.inference_mode():
        batch = Batch(MIXED)
        torch.testing.assert_close(batch.run(backend).double(), batch.reference(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(batch.run(backend).double(), batch.reference(), atol=2e-2, rtol=2e-2)
        cache = _rope_cache(D, 300)
        q, k = ops.rotary(batch.q[:3], batch.k[:3], ops.rope_step(torch.arange(3), cache, D, BF16))
        torch.testing.assert_close(q.double(), _ref_neox(batch.q[:3], torch.arange(3), cache, D), atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(k.double(), _ref_neox(batch.k[:3], torch.arange(3), cache, D), atol=3e-2, rtol=3e-2)
        ops.rotary(batch.q[:3], batch.k[:3], ops.rope_step(torch.arange(3), cache, D, BF16))


def test_bsh_prefill_layout_matches_reference(npu):
    from npu_infer.platform.npu_attention import NpuAttentionBackend
    configure(tnd_paged=False)  # the strict reading of the docs: TND without page attention
    with pytest.raises(NpuOpRejected, match="input_layouts_a2"):
        Batch(MIXED).run(NpuAttentionBackend(D))
    batch = Batch(MIXED)
    out = batch.run(NpuAttentionBackend(D, prefill_layout="BSH"))
    torch.testing.assert_close(out.double(), batch.reference(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("seqs", [[(5, 1), (200, 1), (127, 1)], [(0, 30)], [(128, 3), (0, 1)]],
                         ids=["decode-only", "one-fresh-prefill", "prefix-hit-and-one-token-prefill"])
def test_decode_only_fresh_prefill_and_prefix_hit_batches_match_reference(backend, seqs):
    batch = Batch(seqs)
    torch.testing.assert_close(batch.run(backend).double(), batch.reference(), atol=2e-2, rtol=2e-2)


def test_profile_run_without_cache(backend):
    batch = Batch([(0, 17), (0, 40), (0, 1)], with_cache=False)
    torch.testing.assert_close(batch.run(backend).double(), batch.reference(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("layout", ["TND", "BSH"])
def test_the_step_metadata_is_built_once_and_the_layers_only_read_it(npu, monkeypatch, layout):
    from npu_infer.platform import npu_attention
    backend = npu_attention.NpuAttentionBackend(D, prefill_layout=layout)
    batch = Batch(MIXED)
    meta = backend.build_metadata(batch.meta)
    assert (meta.pad_index is not None) == (layout == "BSH") and meta.prefill_layout == layout

    def derived_in_a_layer(*args):
        raise AssertionError("a layer derived step data the builder had made")
    layer1, layer2 = backend.make_impl(NH, D, batch.scale, KVH), backend.make_impl(NH, D, batch.scale, KVH)
    with monkeypatch.context() as patch:
        patch.setattr(npu_attention, "_pad_index", derived_in_a_layer)
        first = layer1.forward(batch.q, batch.k, batch.v, batch.kv_cache, meta)
        second = layer2.forward(batch.q, batch.k, batch.v, batch.kv_cache, meta)  # the next layer of the step
    assert torch.equal(first, second)
    torch.testing.assert_close(first.double(), batch.reference(), atol=2e-2, rtol=2e-2)
    assert backend.build_metadata(batch.meta).mask is meta.mask  # one mask per device, not one per step


def test_cache_layout_and_shape_limits(backend):
    assert backend.kv_cache_shape(10, 128, 2, 64) == (2, 10, 128, 2, 64)
    with pytest.raises(ValueError, match="head_dim"):  # refused when the layer is built, not at its first step
        backend.make_impl(NH // 4, 256, 1.0, KVH // 2)
    with pytest.raises(ValueError, match="query heads"):
        backend.make_impl(6, D, 1.0, 4)


def test_wrong_cache_layout_is_rejected(backend):
    batch = Batch(MIXED)
    batch.kv_cache = batch.kv_cache.transpose(2, 3).contiguous()  # [2, nb, kv_heads, bs, D]
    with pytest.raises(NpuOpRejected):
        batch.run(backend)


def test_float32_is_rejected(backend):
    batch = Batch(MIXED)
    batch.q, batch.k, batch.v, batch.kv_cache = batch.q.float(), batch.k.float(), batch.v.float(), batch.kv_cache.float()
    with pytest.raises(NpuOpRejected, match="dtype"):
        batch.run(backend)


# =========================================================================== fused ops

@pytest.fixture
def ops(npu):
    from npu_infer.platform.npu_ops import NpuFusedOps
    return NpuFusedOps()


def test_rms_norm_and_add(ops):
    x, res, w = torch.randn(6, 96).to(BF16), torch.randn(6, 96).to(BF16), torch.randn(96).to(BF16)

    def ref(t):
        t = t.double()
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()

    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6).double(), ref(x), atol=3e-2, rtol=3e-2)
    y, s = ops.add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(s.double(), x.double() + res.double(), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(y.double(), ref(x.double() + res.double()), atol=5e-2, rtol=3e-2)
    # a float32 weight (not yet cast with the model) is passed in the input's dtype
    torch.testing.assert_close(ops.rms_norm(x, w.float(), 1e-6).double(), ref(x), atol=3e-2, rtol=3e-2)


def test_silu_and_mul(ops):
    x = torch.randn(5, 2 * 40).to(BF16)
    gate, up = x.double()[:, :40], x.double()[:, 40:]
    torch.testing.assert_close(ops.silu_and_mul(x).double(), gate * torch.sigmoid(gate) * up, atol=3e-2, rtol=3e-2)


def _rope_cache(d, max_pos, base=10000.0):
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float), inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _ref_neox(x, positions, cache, d):
    x = x.double().view(x.shape[0], -1, d)
    cos, sin = cache.double()[positions].chunk(2, dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    c, s = cos[:, None], sin[:, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(1)


def test_rotary_matches_the_neox_reference_and_leaves_its_inputs_untouched(ops):
    T, d = 7, 32
    cache = _rope_cache(d, 64)  # float32 buffer, as the model registers it
    positions = torch.tensor([0, 1, 2, 30, 31, 63, 5])
    qkv = torch.randn(T, (4 + 2 + 2) * d).to(BF16)
    q, k, _ = qkv.split([4 * d, 2 * d, 2 * d], dim=-1)
    q0, k0 = q.clone(), k.clone()
    qr, kr = ops.rotary(q, k, ops.rope_step(positions, cache, d, BF16))
    torch.testing.assert_close(qr.double(), _ref_neox(q0, positions, cache, d), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(kr.double(), _ref_neox(k0, positions, cache, d), atol=3e-2, rtol=3e-2)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # inputs untouched
    # another model with an equal table of its own is fine; one with other values is refused
    ops.rotary(q, k, ops.rope_step(positions, cache.clone(), d, BF16))
    with pytest.raises(RuntimeError, match="first cos/sin cache"):
        ops.rope_step(positions, _rope_cache(d, 64, base=500000.0), d, BF16)


def test_rotary_state_follows_the_torch_npu_module():
    """A new (stand-in) torch_npu module starts with no rotary cache, like a new process."""
    from npu_infer.platform.npu_ops import NpuFusedOps

    from . import install, uninstall
    for base in (10000.0, 500000.0):
        install()
        try:
            q, k = torch.randn(2, 32).to(BF16), torch.randn(2, 32).to(BF16)
            positions, cache = torch.tensor([1, 2]), _rope_cache(32, 8, base)
            # a leftover cache of the other base would be refused ("first cos/sin cache") instead
            ops = NpuFusedOps()
            qr, kr = ops.rotary(q, k, ops.rope_step(positions, cache, 32, BF16))
            torch.testing.assert_close(qr.double(), _ref_neox(q, positions, cache, 32), atol=3e-2, rtol=3e-2)
            torch.testing.assert_close(kr.double(), _ref_neox(k, positions, cache, 32), atol=3e-2, rtol=3e-2)
        finally:
            uninstall()


# =========================================================================== platform seam / torch.npu

def test_platform_on_the_standin(npu):
    from npu_infer.platform.npu import NpuPlatform
    assert NpuPlatform.is_available()
    platform = NpuPlatform()
    platform.check_usable()
    dev = platform.device(0)
    assert dev == torch.device("cpu") and torch.empty(1, device=dev).device.type == "cpu"
    platform.set_device(dev)
    set_device_count(2)
    torch.npu.set_device(1)
    assert torch.npu.current_device() == 1
    with pytest.raises(RuntimeError):
        torch.npu.set_device(2)
    set_memory(free=3 << 30, total=8 << 30, peak=5 << 30, allocated=1 << 30)
    assert platform.mem_get_info() == (3 << 30, 8 << 30)
    assert platform.peak_memory() == 5 << 30 and platform.memory_in_use() == 1 << 30
    platform.reset_peak_memory()
    assert platform.peak_memory() == 1 << 30
    platform.synchronize()
    platform.empty_cache()
    assert calls["synchronize"] == 1 and calls["empty_cache"] == 1
    with pytest.raises(ValueError):
        set_memory(free=9 << 30)


def test_uninstall_restores_everything():
    import sys

    from . import install, uninstall
    had_npu = hasattr(torch, "npu")
    before = sys.modules.get("torch_npu")
    install()
    assert sys.modules["torch_npu"].__standin__ and torch.npu.is_available()
    uninstall()
    assert sys.modules.get("torch_npu") is before and hasattr(torch, "npu") == had_npu
