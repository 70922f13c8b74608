"""The model's config and tokenizer, from an HF directory or from a GGUF file's metadata."""
from __future__ import annotations

from npu_infer.config import EngineConfig
from npu_infer.loaders.formats import is_gguf


def load_hf_config(config: EngineConfig):
    if is_gguf(config.model_path):
        from npu_infer.loaders.gguf_loader import load_gguf_config
        return load_gguf_config(config.model_path)
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read a model config from {config.model_path}: {str(exc).splitlines()[0]}") from None


def load_tokenizer(config: EngineConfig):
    """The tokenizer (or None with skip_tokenizer_init); --chat-template overrides the model's own."""
    if config.skip_tokenizer_init:
        return None
    path = config.tokenizer or config.model_path
    if is_gguf(path):
        from npu_infer.loaders.gguf_loader import load_gguf_tokenizer
        tokenizer = load_gguf_tokenizer(path)
    else:
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load a tokenizer from {path} ({str(exc).splitlines()[0]}); "
                             "pass --tokenizer or --skip-tokenizer-init") from None
    if config.chat_template:
        from pathlib import Path
        template = Path(config.chat_template)
        tokenizer.chat_template = template.read_text() if template.is_file() else config.chat_template
    return tokenizer
