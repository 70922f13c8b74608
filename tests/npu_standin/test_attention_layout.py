"""The NPU paged prefill layout: TND where the kernel takes the head_dim, BSH otherwise, NPU_INFER_NPU_ATTN_LAYOUT
forcing either, and a kernel that rejects TND answered with an error that names the variable."""

from __future__ import annotations

import pytest
import torch

from npu_infer.platform.npu_attention import LAYOUT_ENV, NpuAttentionBackend, choose_prefill_layout

from . import NpuOpRejected, configure
from .test_npu_backend import MIXED, Batch, D


def test_layout_follows_the_head_dim_unless_forced(monkeypatch):
    monkeypatch.delenv(LAYOUT_ENV, raising=False)
    assert [choose_prefill_layout(d) for d in (64, 128, 96, 256)] == ["TND", "TND", "BSH", "BSH"]
    monkeypatch.setenv(LAYOUT_ENV, "bsh")
    assert choose_prefill_layout(128) == "BSH"
    monkeypatch.setenv(LAYOUT_ENV, "TND")
    assert choose_prefill_layout(96) == "TND"
    monkeypatch.setenv(LAYOUT_ENV, "NZ")
    with pytest.raises(ValueError, match=f"{LAYOUT_ENV}='NZ' is not a layout; use TND or BSH"):
        choose_prefill_layout(128)


def test_tnd_rejected_by_the_kernel_names_the_variable_and_bsh_works(npu, monkeypatch):
    configure(tnd_paged=False)  # a CANN that rejects TND with a block table
    monkeypatch.setenv(LAYOUT_ENV, "TND")
    with pytest.raises(NpuOpRejected, match=f"set {LAYOUT_ENV}=BSH"):
        Batch(MIXED).run(NpuAttentionBackend(D))
    monkeypatch.setenv(LAYOUT_ENV, "BSH")
    batch = Batch(MIXED)
    backend = NpuAttentionBackend(D)  # TND for this head_dim unless forced
    torch.testing.assert_close(batch.run(backend).double(), batch.reference(), atol=2e-2, rtol=2e-2)
    assert backend.prefill_layout == "BSH"
