"""What the checkpoint writers (save-sharded-state, tensorize, quantize) share: the source checkpoint read on the
CPU, and its config and tokenizer files copied beside what they write."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from npu_infer.config import EngineConfig
from npu_infer.loaders.hf_files import load_hf_config, load_tokenizer
from npu_infer.loaders.model_path import resolve_model_path
from npu_infer.platform import init_platform

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".tensors", ".gguf")


def copy_side_files(config: EngineConfig, output: Path) -> None:
    """Config, generation config and tokenizer files of the source, so the output is a self-contained model."""
    src = Path(config.model_path)
    if src.is_dir():
        for f in src.iterdir():
            if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES and not f.name.endswith(".index.json"):
                shutil.copy2(f, output / f.name)
        return
    # A single-file checkpoint (GGUF): write what its metadata holds.
    config.hf_config.save_pretrained(output)
    try:
        tokenizer = load_tokenizer(config)
    except ValueError:
        tokenizer = None
    if tokenizer is not None:
        tokenizer.save_pretrained(output)


def source_config(model: str, dtype: str = "auto", load_format: str = "auto", tensor_parallel_size: int = 1,
                  pipeline_parallel_size: int = 1) -> EngineConfig:
    """An EngineConfig for reading a checkpoint on the CPU, this process's platform from now on; dtype `auto`
    keeps the checkpoint's own dtype."""
    config = EngineConfig(model=model, device="cpu", dtype=dtype, load_format=load_format,
                          tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
    config.model_path = resolve_model_path(model)
    hf_config = load_hf_config(config)
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if dtype == "auto":
        config.dtype = DTYPE_NAMES.get(stored, "float32")
    config.resolve(hf_config, init_platform("cpu"))  # the writers read and build on the CPU
    return config
