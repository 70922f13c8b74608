"""make_executor: the executor for a config, the one place that knows every kind (executor_base.py: the interface)."""
from __future__ import annotations

from npu_infer.config import EngineConfig
from npu_infer.platform import Platform
from npu_infer.worker.executor_base import Executor
from npu_infer.worker.multiproc_executor import MultiprocExecutor
from npu_infer.worker.uniproc_executor import UniProcExecutor


def make_executor(config: EngineConfig, platform: Platform) -> Executor:
    """One process for a single rank; a process per rank for tensor / pipeline parallelism."""
    if config.world_size == 1:
        return UniProcExecutor(config, platform)
    return MultiprocExecutor(config, platform)
