"""What a test's ``sitecustomize.py`` runs to put a subprocess (a server, or a TP/PP worker it spawns) on the
strict torch_npu stand-in.  Settings come from the environment, so spawned workers inherit them:

NPU_STANDIN_MEMORY    "free,total" bytes the device reports (default: the stand-in's)
NPU_STANDIN_DEVICES   how many NPUs are visible (default 1)
NPU_STANDIN_KERNELS   JSON list of kernel names to count; with NPU_STANDIN_CALLS_FILE, the counts and the
                      unpinned non_blocking copies are written there (JSON) when the process exits
NPU_STANDIN_GLOO      set: NpuPlatform uses gloo instead of hccl (the ranks talk through the host)

Before installing, it lets transformers probe for torch_npu and find none (the probe is cached), so transformers
does not load NPU kernels of its own, which the stand-in does not emulate."""

from __future__ import annotations

import atexit
import json
import os


def activate() -> None:
    from transformers.utils import import_utils
    import_utils.is_torch_npu_available()
    import_utils.is_torch_npu_available(check_device=True)

    import npu_standin
    module = npu_standin.install(strict=True)
    npu_standin.set_device_count(int(os.environ.get("NPU_STANDIN_DEVICES", "1")))
    if "NPU_STANDIN_MEMORY" in os.environ:
        free, total = map(int, os.environ["NPU_STANDIN_MEMORY"].split(","))
        npu_standin.set_memory(free=free, total=total)
    if os.environ.get("NPU_STANDIN_GLOO"):
        from npu_infer.platform.npu import NpuPlatform
        NpuPlatform.dist_backend = "gloo"
    counts: dict[str, int] = {}

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return call

    for name in json.loads(os.environ.get("NPU_STANDIN_KERNELS", "[]")):
        setattr(module, name, counted(name, getattr(module, name)))
    calls_file = os.environ.get("NPU_STANDIN_CALLS_FILE")
    if calls_file:
        def write() -> None:
            with open(calls_file, "w") as f:
                json.dump({**counts, "unpinned_copies": len(npu_standin.strict_device().unpinned_copies)}, f)
        atexit.register(write)


SITECUSTOMIZE = '''"""Test shim: run this process on the strict torch_npu stand-in (tests/npu_standin/_shim.py)."""
import os, sys
sys.path.insert(0, os.environ["NPU_STANDIN_TESTS_DIR"])
from npu_standin import _shim
_shim.activate()
'''


def write_sitecustomize(directory) -> str:
    """Write the shim into ``directory``; returns the PYTHONPATH that puts it first."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    return os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))
