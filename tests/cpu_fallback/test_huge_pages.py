"""The KV cache asks for transparent huge pages before it is zeroed (npu_infer/platform/huge_pages.py)."""
from __future__ import annotations

import pytest
import torch

from npu_infer.platform.cpu import CpuPlatform
from npu_infer.platform.huge_pages import HUGE_PAGE, advise_huge_pages, thp_mode


def smaps_of(tensor: torch.Tensor) -> tuple[set[str], int]:
    """The VmFlags and the AnonHugePages (KiB) of the mappings that overlap the tensor's memory (/proc/self/smaps)."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    flags, huge_kib, inside = set(), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low < end and high > start
            elif inside and line.startswith("AnonHugePages:"):
                huge_kib += int(line.split()[1])
            elif inside and line.startswith("VmFlags:"):
                flags.update(line.split()[1:])
    return flags, huge_kib


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off on this host")
def test_the_cpu_kv_cache_is_zeroed_on_huge_pages():
    # 48 MiB: above glibc's largest mmap threshold (32 MiB), so fresh pages, as a real layer's cache gets (a small
    # block may be recycled heap memory, already faulted in 4 KB pages, which madvise does not change at once)
    shape = (2, 3, 4096, 16, 64)
    cache = CpuPlatform().kv_cache_tensor(shape, torch.bfloat16, torch.device("cpu"))
    assert cache.shape == shape and cache.dtype == torch.bfloat16
    assert not cache.any()
    if thp_mode() == "madvise":  # with `always` the kernel may use huge pages anyway: nothing to tell apart
        flags, huge_kib = smaps_of(cache)
        # `hg`: the mapping carries MADV_HUGEPAGE. Whether the kernel then found free 2 MB pages to back it depends
        # on the host's memory at that moment (a CI run once got none while a build and a benchmark ran beside it),
        # so the backing itself is only reported.
        assert "hg" in flags, f"the cache's memory was not advised to huge pages (VmFlags {sorted(flags)})"
        print(f"AnonHugePages behind the cache: {huge_kib} KiB (>= {HUGE_PAGE // 1024} when the host had them)")


def test_nothing_to_advise_below_one_aligned_huge_page():
    assert advise_huge_pages(torch.empty(1024)) is False  # 4 KB: no 2 MB-aligned span inside it
