"""The start shared by the engine (node 0) and `npu-infer worker` (other nodes): decide this process's platform from
--device, then resolve the config against the model and the platform, once."""
from __future__ import annotations

from npu_infer.config import EngineConfig
from npu_infer.loaders.hf_files import load_hf_config
from npu_infer.loaders.model_path import resolve_model_path
from npu_infer.platform import Platform, init_platform


def resolve_engine_config(config: EngineConfig) -> Platform:
    """Decide the platform (an unusable --device fails here, before any file is read), then fill in the model path,
    the HF config, the dtype, block size and lengths. The worker processes receive the resolved config."""
    platform = init_platform(config.device)
    config.model_path = resolve_model_path(config.model)
    config.resolve(load_hf_config(config), platform)
    return platform
