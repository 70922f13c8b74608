"""Executors: how the engine reaches its workers. One process here; multi-process for TP/PP."""
from __future__ import annotations

from npu_infer.config import EngineConfig
from npu_infer.worker.multiproc_executor import MultiprocExecutor
from npu_infer.worker.step_io import StepInput, StepOutput
from npu_infer.worker.worker import Worker


class UniProcExecutor:
    """The single worker lives in the engine's own process."""

    def __init__(self, config: EngineConfig):
        self.worker = Worker(config)
        self.worker.init_device()
        self.worker.load_model()
        self.num_blocks = self.worker.determine_num_blocks()
        self.memory = dict(self.worker.memory)

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

    def execute(self, step: StepInput) -> StepOutput:
        return self.worker.execute_model(step)

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig):
    if config.world_size == 1:
        return UniProcExecutor(config)
    return MultiprocExecutor(config)
