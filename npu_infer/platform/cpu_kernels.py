"""The AVX-512 CPU kernels (cpu_kernels.cpp, cpu_int8_kernels.cpp, the decode stack of cpu_decode_stack.cpp, bound in
cpu_module.cpp), compiled on first use into one module and cached (torch's JIT extension loader).

`load()` returns the compiled module, or None where it cannot be had: a CPU without AVX-512 BF16, no compiler,
or NPU_INFER_CPU_KERNELS=0. Callers then use their plain-torch twins, so the kernels only ever make things faster.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from npu_infer import envs

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
# Every cpu_*.cpp here is compiled into the module, and every cpu_*.cpp and cpu_*.h is in its build key.
SOURCE_GLOBS = ("cpu_*.cpp", "cpu_*.h")
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo lists for this CPU (empty where it cannot be read)."""
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


# A build's lock (torch's FileBaton) older than this was left by a process killed while building: remove it.
STALE_LOCK_S = 180.0


def build_directory(name: str) -> Path:
    """Where the kernels of this source, torch and CPU are built: TORCH_EXTENSIONS_DIR, else ~/.cache."""
    root = envs.TORCH_EXTENSIONS_DIR or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "torch_extensions")
    return Path(root) / name


def _import_built(name: str, directory: Path) -> ModuleType | None:
    """The module when a finished build is there, imported without torch's loader: that loader takes the build
    lock on every load, and a process killed while holding it (a worker, say) would hang every later load."""
    lock = directory / "lock"
    waited = 0.0
    while lock.exists():  # someone is building: wait for it, or find its lock stale
        age = time.time() - lock.stat().st_mtime
        if age > STALE_LOCK_S or waited > STALE_LOCK_S:
            logger.warning("removing a stale CPU kernel build lock (%.0f s old): %s", age, lock)
            lock.unlink(missing_ok=True)
            break
        time.sleep(0.5)
        waited += 0.5
    library = directory / f"{name}.so"
    if not library.is_file():
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def source_files(directory: Path = HERE) -> list[Path]:
    """The C++ sources and headers of the module in `directory`, in a fixed order."""
    return sorted(path for pattern in SOURCE_GLOBS for path in directory.glob(pattern))


def build_name(flags: set[str], directory: Path = HERE) -> str:
    """The module's name and build directory: a digest of every source's name and bytes (a change to any, header
    included, must rebuild), the torch and Python versions and the CPU flags (-march=native code must not be
    reused on another CPU)."""
    digest = hashlib.sha1()
    for path in source_files(directory):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    digest.update(f"{torch.__version__}{sys.version_info[:2]}{' '.join(sorted(flags))}".encode())
    return f"npu_infer_cpu_kernels_{digest.hexdigest()[:12]}"


@functools.cache
def load() -> ModuleType | None:
    if not envs.NPU_INFER_CPU_KERNELS:
        return None
    flags = cpu_flags()
    missing = [f for f in REQUIRED_FLAGS if f not in flags]
    if missing:
        logger.info("CPU kernels off: this CPU lacks %s", ", ".join(missing))
        return None
    name = build_name(flags)
    directory = build_directory(name)
    try:
        module = _import_built(name, directory)
        if module is not None:
            return module
        from torch.utils.cpp_extension import load as load_extension
        _put_ninja_on_path()
        directory.mkdir(parents=True, exist_ok=True)
        logger.info("building the CPU kernels (once, about 25 s on 2 cores, then cached in %s)", directory)
        sources = [str(path) for path in source_files() if path.suffix == ".cpp"]
        return load_extension(name=name, sources=sources, build_directory=str(directory),
                              extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                              verbose=False)
    except Exception as exc:  # no compiler, no ninja, a build error: the plain-torch ops still work
        logger.warning("CPU kernels unavailable, using plain torch ops: %s", str(exc).strip().splitlines()[-1:])
        return None
