"""Every environment variable npu_infer reads, each with its doc line; `envs.NAME` reads one (docs/server.md lists
them, from ENV_VARS).

Read on each access, not at import: a launcher or a test may set one after npu_infer was imported. Nothing else in
npu_infer reads os.environ (tests/test_envs.py checks)."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EnvVar:
    name: str
    doc: str
    parse: Callable[[str | None], Any]  # the raw value (None when unset) -> what the code uses


def _text(raw: str | None) -> str | None:
    return raw or None  # set but empty counts as unset


def _switch(raw: str | None) -> bool:
    return raw != "0"  # on unless set to 0


def _seconds(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"NPU_INFER_STEP_TIMEOUT={raw!r} is not a number of seconds; set e.g. 600, or unset it") \
            from None


def _alpha(raw: str | None) -> float:
    try:
        alpha = 0.75 if raw is None else float(raw)
    except ValueError:
        alpha = -1.0
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"NPU_INFER_W8A8_SMOOTHING={raw!r} must be a number from 0 (no smoothing) to 1")
    return alpha


def _group_size(raw: str | None) -> int:
    if raw is None:
        return _DEFAULT_W8A16_GROUP_SIZE
    if raw == "channel":
        return 0
    if not raw.isdigit() or int(raw) % 2:
        raise ValueError(f"NPU_INFER_W8A16_GROUP_SIZE={raw!r} is not an even number of input channels; set e.g. 32, "
                         "64 or 128, or `channel` for one scale per output channel")
    return int(raw)


# Measured on SmolLM2-135M (docs/quantization.md): the largest group within 1 % of bf16's perplexity.
_DEFAULT_W8A16_GROUP_SIZE = 64
# Like vLLM-CPU's VLLM_CPU_KVCACHE_SPACE default: the host also runs the OS and the server.
_DEFAULT_CPU_KV_CACHE_CAP = 4 * 1024**3


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("NPU_INFER_API_KEY", "the API key the server requires when --api-key is not given", _text),
    EnvVar("VLLM_API_KEY", "vLLM's name for the API key, read when neither --api-key nor NPU_INFER_API_KEY is "
                           "given", _text),
    EnvVar("NPU_INFER_STEP_TIMEOUT", "overrides --step-timeout: fail a step whose workers do not answer within "
                                     "this many seconds", _seconds),
    EnvVar("NPU_INFER_PP_LAYER_PARTITION", "layers per pipeline stage, e.g. `12,12` (default: an even split, "
                                           "later stages taking the rest)", _text),
    EnvVar("NPU_INFER_BNB_QUANT", "bitsandbytes mode when quantizing on load: nf4 (default), fp4 or int8",
           lambda raw: "nf4" if raw is None else raw),
    EnvVar("NPU_INFER_W8A8_SMOOTHING", "SmoothQuant's alpha for --quantization w8a8 on load (default 0.75; 0: no "
                                       "smoothing)", lambda raw: _alpha(raw)),
    EnvVar("NPU_INFER_W8A16_GROUP_SIZE", "input channels per weight scale for w8a16 (`--quantization w8a16` "
                                          f"and `npu-infer quantize`): default {_DEFAULT_W8A16_GROUP_SIZE}; `channel` "
                                          "(or 0) for one scale per output channel", _group_size),
    EnvVar("NPU_INFER_INT8_LM_HEAD", "1: --quantization w8a8 or w8a16 on load makes the LM head int8 too (its logits "
                                     "stay fp32; the embedding stays in the model dtype). Default 0: a bf16 LM head",
           lambda raw: raw == "1"),
    EnvVar("NPU_INFER_CPU_KERNELS", "0: plain torch ops instead of the AVX-512 C++ kernels", _switch),
    EnvVar("NPU_INFER_CPU_DECODE_STACK", "0: CPU decode steps run through the Python layers, not the C++ decode "
                                         "stack", _switch),
    EnvVar("NPU_INFER_CPU_PACK_WEIGHTS", "0: linear weights are not packed for oneDNN / the kernels at load (less "
                                         "memory, slower)", _switch),
    EnvVar("NPU_INFER_CPU_KV_CACHE_CAP", "most bytes the CPU KV cache takes when --kv-cache-memory is not given "
                                         "(default 4 GiB)",
           lambda raw: int(raw) if raw is not None else _DEFAULT_CPU_KV_CACHE_CAP),
    EnvVar("NPU_INFER_NPU_ATTN_LAYOUT", "TND or BSH: forces the NPU paged prefill's query layout (BSH where a CANN "
                                        "rejects TND with error 561002)", lambda raw: raw),
    EnvVar("ASCEND_RT_VISIBLE_DEVICES", "the NPUs this process may use (named in device errors and `npu-infer env`)",
           lambda raw: raw),
    EnvVar("CUDA_VISIBLE_DEVICES", "the GPUs this process may use (named in device errors)", lambda raw: raw),
    EnvVar("ASCEND_TOOLKIT_HOME", "where `npu-infer env` looks for CANN first", _text),
    EnvVar("ASCEND_HOME_PATH", "where `npu-infer env` looks for CANN next", _text),
    EnvVar("ATB_HOME_PATH", "where `npu-infer env` looks for the ATB library", _text),
    EnvVar("TORCH_EXTENSIONS_DIR", "where the CPU kernels are built (default ~/.cache/torch_extensions)", _text),
    EnvVar("HF_HOME", "the Hugging Face cache root a model id is looked up in (default ~/.cache/huggingface)",
           _text),
    EnvVar("HF_HUB_CACHE", "the Hugging Face hub cache (default $HF_HOME/hub)", _text),
    EnvVar("HUGGINGFACE_HUB_CACHE", "the older name of HF_HUB_CACHE", _text),
    EnvVar("MODELSCOPE_CACHE", "the ModelScope cache root a model id is looked up in (default ~/.cache/modelscope)",
           _text),
)
_BY_NAME = {var.name: var for var in ENV_VARS}


def __getattr__(name: str) -> Any:
    var = _BY_NAME.get(name)
    if var is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return var.parse(os.environ.get(name))


def __dir__() -> list[str]:
    return sorted(_BY_NAME)


def markdown_table() -> str:
    """The table docs/server.md shows (tests/test_envs.py checks it is there, unchanged)."""
    rows = ["| variable | meaning |", "|---|---|"]
    rows += [f"| `{var.name}` | {var.doc} |" for var in ENV_VARS]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
