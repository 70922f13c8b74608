"""Transparent huge pages for a large host tensor, before its memory is first touched.

The paged KV cache is read in 2 KB blocks scattered over hundreds of MB: with 4 KB pages nearly every block costs
a TLB miss and a page walk. On hosts where THP is `madvise` (the common default), asking for huge pages on the
cache's range before it is zeroed makes the kernel back it with 2 MB pages. Linux only; elsewhere, or where THP
is off, nothing changes."""
from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MADV_HUGEPAGE = 14  # <sys/mman.h>
HUGE_PAGE = 2 * 1024 * 1024
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """`always`, `madvise` or `never` (the bracketed word of the sysfs setting), None where there is none."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """madvise(MADV_HUGEPAGE) over the 2 MB-aligned part of a CPU tensor's memory; True when the kernel took it.
    Call it before the memory is written: pages already faulted in (recycled heap memory: glibc serves blocks under
    its mmap threshold, at most 32 MiB, from the heap) stay 4 KB until khugepaged collapses them."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or thp_mode() not in ("always", "madvise"):
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    aligned_start = -(-start // HUGE_PAGE) * HUGE_PAGE
    aligned_end = end // HUGE_PAGE * HUGE_PAGE
    if aligned_end <= aligned_start:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(ctypes.c_void_p(aligned_start), ctypes.c_size_t(aligned_end - aligned_start), MADV_HUGEPAGE):
        logger.debug("madvise(MADV_HUGEPAGE) failed: errno %d", ctypes.get_errno())
        return False
    return True
