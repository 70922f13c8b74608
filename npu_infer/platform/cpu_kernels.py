"""The AVX-512 CPU kernels of cpu_kernels.cpp, compiled on first use and cached (torch's JIT extension loader).

`load()` returns the compiled module, or None where it cannot be had: a CPU without AVX-512 BF16, no compiler,
or NPU_INFER_CPU_KERNELS=0. Callers then use their plain-torch twins, so the kernels only ever make things faster.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _put_ninja_on_path() -> None:
    """torch's loader runs `ninja`; the PyPI wheel puts it beside the interpreter, which may not be on PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


@functools.cache
def load() -> ModuleType | None:
    if os.environ.get("NPU_INFER_CPU_KERNELS", "1") == "0":
        return None
    flags = _cpu_flags()
    missing = [f for f in REQUIRED_FLAGS if f not in flags]
    if missing:
        logger.info("CPU kernels off: this CPU lacks %s", ", ".join(missing))
        return None
    source = SOURCE.read_text()
    # -march=native code must not be reused on another CPU, nor across torch versions.
    digest = hashlib.sha1((source + torch.__version__ + " ".join(sorted(flags))).encode()).hexdigest()[:12]
    try:
        from torch.utils.cpp_extension import load as load_extension
        _put_ninja_on_path()
        logger.info("loading the CPU kernels (compiled once, about 25 s on 2 cores, then cached)")
        return load_extension(name=f"npu_infer_cpu_kernels_{digest}", sources=[str(SOURCE)],
                              extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                              verbose=False)
    except Exception as exc:  # no compiler, no ninja, a build error: the plain-torch ops still work
        logger.warning("CPU kernels unavailable, using plain torch ops: %s", str(exc).strip().splitlines()[-1:])
        return None
