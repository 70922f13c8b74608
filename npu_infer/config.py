"""EngineConfig: every setting of one engine, validated once where it enters."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from npu_infer.platform.interface import Platform

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy", "sharded_state", "tensorizer", "bitsandbytes", "gguf")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def human_readable_int(value: str) -> int:
    """vLLM's reading of '32k', '1M', '25.6k': lower-case suffixes are powers of 1000, upper-case of 1024
    (whole numbers only); a plain number is itself."""
    value = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value)
    if not match:
        return int(value)
    number, suffix = match.groups()
    if suffix.islower():
        return int(float(number) * 1000 ** ("kmgt".index(suffix) + 1))
    if not number.isdigit():
        raise ValueError(f"{value!r}: a binary suffix ({suffix}) takes a whole number; did you mean "
                         f"{number}{suffix.lower()}?")
    return int(number) * 1024 ** ("KMGT".index(suffix) + 1)


def parse_bytes(value: int | str | None) -> int | None:
    """Parse a memory size such as 4294967296, '4GiB', '512MB' or vLLM's '4G' (= 4 * 2**30) into bytes."""
    if value is None or isinstance(value, int):
        return value
    if re.fullmatch(r"\s*\d+(\.\d+)?[kKmMgGtT]?\s*", str(value)):
        return human_readable_int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"cannot read memory size {value!r}; write bytes or e.g. '4GiB', '512MiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


@dataclass
class EngineConfig:
    model: str = ""
    tokenizer: str | None = None
    served_model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int | None = None  # None: the platform's default (Platform.default_block_size)
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | str | None = None
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = False
    load_format: str = "auto"
    seed: int = 0
    skip_tokenizer_init: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    trust_remote_code: bool = False
    chat_template: str | None = None
    quantization: str | None = None
    # Structured outputs and reasoning (--structured-outputs-config, --reasoning-parser), priority scheduling.
    structured_outputs_backend: str = "auto"          # auto (xgrammar, else llguidance) | xgrammar | guidance
    structured_outputs_disable_any_whitespace: bool = False
    reasoning_parser: str | None = None
    scheduling_policy: str = "fcfs"                   # fcfs | priority
    # vLLM's --generation-config (auto | vllm | a directory) and --override-generation-config: the sampling
    # defaults a request gets for the fields it leaves out (npu_infer/generation_config.py).
    generation_config: str = "auto"
    override_generation_config: dict | None = None
    # Seconds one step may take before the engine gives up on its workers (0: no limit); /health says 503 past it.
    step_timeout: float = 300.0
    # Multi-node rendezvous (torch.distributed): rank 0's node runs the engine, others run `npu-infer worker`.
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    # Filled in by resolve(): the HF config, the torch dtype and the resolved model path.
    hf_config: Any = field(default=None, repr=False)
    torch_dtype: torch.dtype | None = None
    model_path: str | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.block_size is not None and (self.block_size < 1 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"unknown load format {self.load_format!r}; choose one of {', '.join(LOAD_FORMATS)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose auto, float32, bfloat16 or float16")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size must be >= 1")
        self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.served_model_name is None:
            self.served_model_name = self.model
        if self.structured_outputs_backend not in ("auto", "xgrammar", "guidance"):
            raise ValueError(f"unknown structured outputs backend {self.structured_outputs_backend!r}; "
                             "use auto, xgrammar or guidance")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"unknown scheduling policy {self.scheduling_policy!r}; use fcfs or priority")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def resolve(self, hf_config: Any, platform: Platform) -> None:
        """Fix what depends on the platform (device, dtype, block size: platform.check_and_update_config) and on
        the model's config (lengths): once per process, before any weights are read."""
        self.hf_config = hf_config
        platform.check_and_update_config(self)
        model_max = getattr(hf_config, "max_position_embeddings", None) or 2048
        if self.max_model_len is None:
            self.max_model_len = model_max
        elif self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        elif self.max_model_len > model_max:
            raise ValueError(f"max_model_len {self.max_model_len} is larger than the model's "
                             f"max_position_embeddings {model_max}; lower --max-model-len")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(2048, self.max_num_seqs)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}) so every running sequence can decode in one step")
