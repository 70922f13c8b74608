"""UniProcExecutor: the single worker lives in the engine's own process (no TP/PP)."""
from __future__ import annotations

from npu_infer.config import EngineConfig
from npu_infer.platform import Platform
from npu_infer.worker.executor_base import Executor, check_rpc_method
from npu_infer.worker.step_io import StepInput, StepOutput
from npu_infer.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig, platform: Platform):
        self.worker = Worker(config, platform)
        self.worker.init_device()
        self.worker.load_model()
        self.num_blocks = self.worker.determine_num_blocks()
        self.memory = dict(self.worker.memory)

    def collective_rpc(self, method: str, arg: object = None) -> list:
        check_rpc_method(method)
        return [getattr(self.worker, method)(arg)]

    def execute(self, step: StepInput) -> StepOutput:
        return self.worker.execute_model(step)
