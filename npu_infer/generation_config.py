"""The model's own sampling defaults, as vLLM's --generation-config reads them.

`auto` (vLLM's default) takes generation_config.json from the model directory, `vllm` takes none, a directory
takes that directory's file. Of the file, vLLM uses temperature, top_p, top_k, min_p, repetition_penalty and
max_new_tokens (as max_tokens), and only where they differ from transformers' GenerationConfig defaults (it reads
the file through `GenerationConfig.to_diff_dict()`); --override-generation-config then sets any of them. A request
that leaves a field out gets this default; a GGUF file carries no generation_config.json, so nothing changes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILE = "generation_config.json"
# generation_config.json field -> SamplingParams field
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# transformers' GenerationConfig defaults: a file value equal to these is not a difference, so vLLM drops it.
_HF_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": None, "repetition_penalty": 1.0,
                "max_new_tokens": None}


def sampling_defaults(source: str, model_path: str | None, overrides: dict | None = None) -> dict[str, Any]:
    """SamplingParams keyword defaults from --generation-config `source` (auto | vllm | a directory)."""
    values: dict[str, Any] = {}
    if source != "vllm":
        directory = model_path if source == "auto" else source
        file = Path(directory) / FILE if directory else None
        if file is not None and file.is_file():
            try:
                values = json.loads(file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"cannot read {file}: {exc}") from None
            values = {k: v for k, v in values.items() if k in FIELDS and v is not None and v != _HF_DEFAULTS[k]}
        elif source != "auto":
            raise ValueError(f"--generation-config {source}: no {FILE} there; pass auto, vllm or a directory "
                             f"that holds one")
    unknown = set(overrides or {}) - set(FIELDS)
    if unknown:
        raise ValueError(f"--override-generation-config: unknown field(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(FIELDS)}")
    values.update(overrides or {})
    return {FIELDS[k]: v for k, v in values.items()}
