"""The KV cache asks for transparent huge pages before it is zeroed (npu_infer/platform/huge_pages.py)."""
from __future__ import annotations

import pytest
import torch

from npu_infer.platform.cpu import CpuPlatform
from npu_infer.platform.huge_pages import HUGE_PAGE, advise_huge_pages, thp_mode


def huge_kib_in(tensor: torch.Tensor) -> int:
    """AnonHugePages (KiB) of the mappings that overlap the tensor's memory, from /proc/self/smaps."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low < end and high > start
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off on this host")
def test_the_cpu_kv_cache_is_zeroed_on_huge_pages():
    # 48 MiB: above glibc's largest mmap threshold (32 MiB), so fresh pages, as a real layer's cache gets (a small
    # block may be recycled heap memory, already faulted in 4 KB pages, which madvise does not change at once)
    shape = (2, 3, 4096, 16, 64)
    cache = CpuPlatform().kv_cache_tensor(shape, torch.bfloat16, torch.device("cpu"))
    assert cache.shape == shape and cache.dtype == torch.bfloat16
    assert not cache.any()
    if thp_mode() == "madvise":  # with `always` the kernel may use huge pages anyway: nothing to tell apart
        assert huge_kib_in(cache) >= HUGE_PAGE // 1024, "the cache's memory is not on huge pages"


def test_nothing_to_advise_below_one_aligned_huge_page():
    assert advise_huge_pages(torch.empty(1024)) is False  # 4 KB: no 2 MB-aligned span inside it
