"""Architecture name (config.architectures[0]) -> model class."""
from __future__ import annotations

from torch import nn

from npu_infer.models.llama import LlamaForCausalLM, Qwen2ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def get_model_class(hf_config) -> type[nn.Module]:
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in MODELS:
            return MODELS[arch]
    model_type = getattr(hf_config, "model_type", "")
    by_type = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}
    if model_type in by_type:
        return by_type[model_type]
    raise ValueError(f"model architecture {getattr(hf_config, 'architectures', None) or model_type!r} is not "
                     f"supported; supported: {', '.join(MODELS)}")
