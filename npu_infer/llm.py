"""The offline API: LLM(model=...).generate(prompts, params) and .chat(messages, params), as in vLLM."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

from npu_infer.api.vllm_flags import FLAGS_BY_NAME, check_vllm_kwargs
from npu_infer.config import EngineConfig
from npu_infer.engine.llm_engine import LLMEngine
from npu_infer.outputs import RequestOutput
from npu_infer.sampling import RequestOutputKind, SamplingParams

logger = logging.getLogger("npu_infer.llm")

# vLLM's LLM(...) names for EngineConfig fields, and its keyword arguments that mean nothing offline here.
_ALIASES = {"kv_cache_memory_bytes": "kv_cache_memory"}
_OFFLINE_NO_EFFECT = {"disable_log_stats": "the offline engine logs no periodic stats"}
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)} - {"hf_config", "torch_dtype", "model_path"}


def engine_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """LLM(...)'s keyword arguments as EngineConfig's: vLLM's spellings renamed, vLLM's harmless arguments
    dropped with one warning each, the ones that would change results refused (ValueError), unknown names a
    TypeError, as any Python call."""
    out, vllm_only = {}, {}
    for name, value in kwargs.items():
        field = _ALIASES.get(name, name)
        if field in _ENGINE_FIELDS:
            if field in out:
                raise TypeError(f"LLM() got {field} twice (as {name} and under another name)")
            out[field] = value
        elif name in FLAGS_BY_NAME:
            vllm_only[name] = value
        elif name in _OFFLINE_NO_EFFECT:
            logger.warning("%s=%r is accepted for vLLM compatibility and has no effect here: %s", name, value,
                           _OFFLINE_NO_EFFECT[name])
        else:
            raise TypeError(f"LLM() got an unexpected keyword argument {name!r}; it takes "
                            f"{', '.join(sorted(_ENGINE_FIELDS - {'model'}))} and vLLM's arguments listed in "
                            "README (Coming from vLLM)")
    check_vllm_kwargs(vllm_only)
    return out


class LLM:
    def __init__(self, model: str, **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs(kwargs)))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams from the model's generation config (--generation-config), as vLLM's LLM gives them."""
        return SamplingParams(**self.engine.sampling_defaults)

    def generate(self, prompts: str | dict | Sequence, sampling_params: SamplingParams | Sequence | None = None,
                 use_tqdm: bool | Callable[..., tqdm] = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts: strings, token-id lists or {"prompt_token_ids": [...]}.
        No sampling_params: the model's generation-config defaults. use_tqdm: a progress bar as vLLM's (or the
        tqdm class to draw it with)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.get_default_sampling_params()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        for p in params_list:
            p.output_kind = RequestOutputKind.FINAL_ONLY  # as vLLM's LLM: one output per request, when it ends
        ids = []
        try:
            for prompt, p in zip(prompts, params_list):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, p)
                ids.append(request_id)
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        done: dict[str, RequestOutput] = {}
        bar = _ProgressBar(len(ids), use_tqdm)
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.finished(out)
            failures = self.engine.take_failures()
            if failures:  # the others are finished off first, so nothing stays allocated
                for request_id in ids:
                    self.engine.abort_request(request_id)
                raise next(iter(failures.values()))
        bar.close()
        return [done[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool | Callable[..., tqdm] = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, tools: list[dict] | None = None,
             documents: list[dict] | None = None, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Apply the tokenizer's chat template (with the tools and documents, as vLLM), then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer; it is off (skip_tokenizer_init)")
        prompts = []
        for conversation in conversations:
            ids = tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=True,
                                                add_generation_prompt=add_generation_prompt, tools=tools,
                                                documents=documents, **(chat_template_kwargs or {}))
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm)


class _ProgressBar:
    """vLLM's offline progress bar: prompts done, with the input and output token rates so far."""

    def __init__(self, total: int, use_tqdm: bool | Callable[..., tqdm]):
        make = use_tqdm if callable(use_tqdm) else tqdm
        self.bar = make(total=total, desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm,
                        postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
        self.start = time.perf_counter()
        self.input_tokens = self.output_tokens = 0

    def finished(self, out: RequestOutput) -> None:
        self.input_tokens += len(out.prompt_token_ids)
        self.output_tokens += sum(len(o.token_ids) for o in out.outputs)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.postfix = (f"est. speed input: {self.input_tokens / elapsed:.2f} toks/s, "
                            f"output: {self.output_tokens / elapsed:.2f} toks/s")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
