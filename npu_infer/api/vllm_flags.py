"""vLLM's command-line flags that this engine has no use for, so that vLLM command lines run unchanged.

Each flag has one disposition: accepted with one warning line (it changes nothing that a client can see here:
a CUDA-graph, scheduling-mode, download or process-layout knob), or refused with the reason (honouring it would
change results, or it needs a feature this engine does not have). A value-dependent flag is accepted for its
harmless values (e.g. `--tokenizer-mode auto`) and refused for the others. The flags this engine implements are
defined with their groups in args.py; this table is what README's "Coming from vLLM" table lists."""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("npu_infer.api.args")

# How a flag reads its value: "value" takes one argument, "bool" is a --flag / --no-flag pair (vLLM's booleans),
# "list" takes one or more arguments, "optional" may stand alone or take a value (vLLM's -O3 / -O 3).
_KINDS: dict[str, dict] = {"value": {"metavar": "VALUE"}, "bool": {"action": argparse.BooleanOptionalAction},
                           "list": {"nargs": "+", "metavar": "VALUE"},
                           "optional": {"nargs": "?", "const": "", "metavar": "VALUE"}}


@dataclass(frozen=True)
class VllmFlag:
    flags: tuple[str, ...]
    kind: str
    why: str                                        # why it changes nothing here, or why it is refused
    harmless: Callable[[Any], bool] | None = None   # None: every value is accepted; else False means refused

    @property
    def name(self) -> str:
        """The flag as a Python name, as vLLM's LLM(...) keyword arguments spell it (enforce_eager)."""
        return self.flags[0].lstrip("-").replace("-", "_")

    @property
    def dest(self) -> str:
        return "vllm_" + self.name

    @property
    def always_refused(self) -> bool:
        return self.harmless is _never


def _never(_value: Any) -> bool:
    return False


def _false(value: Any) -> bool:
    return not value


def _one_of(*allowed: str) -> Callable[[Any], bool]:
    return lambda value: str(value).lower() in allowed


def _at_most(limit: float) -> Callable[[Any], bool]:
    return lambda value: float(value) <= limit


_NO_CUDA_GRAPHS = "this engine runs eagerly on every device (no CUDA graphs, no torch.compile)"
_SCHEDULER = "the scheduler here is vLLM V1's: chunked prefill always on, preemption by recompute"
_LOCAL_ONLY = "models are read from a path or the local HF / ModelScope cache, never downloaded"
_ONE_PROCESS = "the server is one process; workers are started per rank by this engine itself"

VLLM_FLAGS: tuple[VllmFlag, ...] = (
    # ---- accepted, with one warning line: nothing a client sees changes ----
    VllmFlag(("--enforce-eager",), "bool", _NO_CUDA_GRAPHS),
    VllmFlag(("--compilation-config", "-O"), "optional", _NO_CUDA_GRAPHS),
    VllmFlag(("--cuda-graph-sizes",), "list", _NO_CUDA_GRAPHS),
    VllmFlag(("--max-seq-len-to-capture",), "value", _NO_CUDA_GRAPHS),
    VllmFlag(("--max-cudagraph-capture-size",), "value", _NO_CUDA_GRAPHS),
    VllmFlag(("--swap-space",), "value", "preempted requests are recomputed (vLLM V1), nothing is swapped to CPU"),
    VllmFlag(("--cpu-offload-gb",), "value", "weights stay on the device"),
    VllmFlag(("--enable-chunked-prefill",), "bool", _SCHEDULER),
    VllmFlag(("--max-num-partial-prefills",), "value", _SCHEDULER),
    VllmFlag(("--max-long-partial-prefills",), "value", _SCHEDULER),
    VllmFlag(("--long-prefill-token-threshold",), "value", _SCHEDULER),
    VllmFlag(("--preemption-mode",), "value", _SCHEDULER),
    VllmFlag(("--num-scheduler-steps",), "value", _SCHEDULER),
    VllmFlag(("--scheduler-delay-factor",), "value", _SCHEDULER),
    VllmFlag(("--num-lookahead-slots",), "value", _SCHEDULER),
    VllmFlag(("--async-scheduling",), "bool", _SCHEDULER),
    VllmFlag(("--disable-chunked-mm-input",), "bool", "text-only models"),
    VllmFlag(("--disable-hybrid-kv-cache-manager",), "bool", "one KV-cache manager for all layers"),
    VllmFlag(("--kv-sharing-fast-prefill",), "bool", "no cross-layer KV sharing"),
    VllmFlag(("--prefix-caching-hash-algo",), "value", "prefix blocks are keyed by this engine's own hash"),
    VllmFlag(("--disable-custom-all-reduce",), "bool", "all-reduce is torch.distributed's (HCCL / NCCL / gloo)"),
    VllmFlag(("--distributed-executor-backend",), "value", "one worker process per rank (vLLM's `mp`), always"),
    VllmFlag(("--max-parallel-loading-workers",), "value", "each rank loads its own shard"),
    VllmFlag(("--disable-frontend-multiprocessing",), "bool", _ONE_PROCESS),
    VllmFlag(("--api-server-count", "-asc"), "value", _ONE_PROCESS, _one_of("1")),
    VllmFlag(("--data-parallel-size", "-dp"), "value", "no data parallelism: run one server per replica",
             _one_of("1")),
    VllmFlag(("--enable-expert-parallel",), "bool", "no mixture-of-experts models here", _false),
    VllmFlag(("--enable-eplb",), "bool", "no mixture-of-experts models here", _false),
    VllmFlag(("--revision",), "value", _LOCAL_ONLY),
    VllmFlag(("--code-revision",), "value", _LOCAL_ONLY),
    VllmFlag(("--tokenizer-revision",), "value", _LOCAL_ONLY),
    VllmFlag(("--download-dir",), "value", _LOCAL_ONLY),
    VllmFlag(("--hf-token",), "optional", _LOCAL_ONLY),
    VllmFlag(("--ignore-patterns",), "list", "only the weight files the format needs are read"),
    VllmFlag(("--use-tqdm-on-load",), "bool", "loading logs its own progress"),
    VllmFlag(("--pt-load-map-location",), "value", ".bin files are read onto the CPU, then placed per rank"),
    VllmFlag(("--tokenizer-mode",), "value", "the tokenizer is transformers' fast tokenizer; other modes would "
                                             "tokenize differently", _one_of("auto", "hf")),
    VllmFlag(("--config-format",), "value", "config.json (or the GGUF metadata) is read", _one_of("auto", "hf")),
    VllmFlag(("--model-impl",), "value", "the engine's own model code", _one_of("auto", "vllm")),
    VllmFlag(("--runner",), "value", "generation only (no pooling / embedding models)", _one_of("auto", "generate")),
    VllmFlag(("--task",), "value", "generation only (no pooling / embedding models)", _one_of("auto", "generate")),
    VllmFlag(("--disable-sliding-window",), "bool", "the Llama / Qwen2 models here attend to the whole context"),
    VllmFlag(("--disable-cascade-attn",), "bool", "no cascade attention"),
    VllmFlag(("--disable-async-output-proc",), "bool", "outputs are processed after each step"),
    VllmFlag(("--logits-processor-pattern",), "value", "no custom logits processors"),
    VllmFlag(("--enable-sleep-mode",), "bool", "no sleep mode; the engine holds its memory while it runs"),
    VllmFlag(("--calculate-kv-scales",), "bool", "the KV cache is kept in the model's dtype", _false),
    VllmFlag(("--limit-mm-per-prompt",), "value", "text-only models"),
    VllmFlag(("--mm-processor-kwargs",), "value", "text-only models"),
    VllmFlag(("--disable-mm-preprocessor-cache",), "bool", "text-only models"),
    VllmFlag(("--allowed-local-media-path",), "value", "text-only models"),
    VllmFlag(("--enable-log-outputs",), "bool", "request logs give token counts and timings, not the outputs"),
    VllmFlag(("--enable-server-load-tracking",), "bool", "load is in /metrics (running and waiting requests)"),
    VllmFlag(("--enable-request-id-headers",), "bool", "responses carry their id in the body"),
    VllmFlag(("--log-config-file",), "value", "logging is configured by npu_infer (Python's logging module)"),
    VllmFlag(("--show-hidden-metrics-for-version",), "value", "every metric is shown"),
    VllmFlag(("--otlp-traces-endpoint",), "value", "no OpenTelemetry tracing"),
    VllmFlag(("--collect-detailed-traces",), "value", "no OpenTelemetry tracing"),
    VllmFlag(("--kv-events-config",), "value", "no KV-cache event publishing"),
    VllmFlag(("--additional-config",), "value", "no platform plugins"),
    VllmFlag(("--enable-ssl-refresh",), "bool", "certificates are read once, at start"),
    VllmFlag(("--max-logprobs",), "value", "up to 20 logprobs per token are returned, as vLLM's default",
             _at_most(20)),
    VllmFlag(("--logprobs-mode",), "value", "logprobs are those of the raw model distribution (vLLM's default)",
             _one_of("raw_logprobs")),
    VllmFlag(("--response-role",), "value", "chat responses come from the `assistant` role", _one_of("assistant")),
    # ---- refused: honouring them would change results, or they need what this engine does not have ----
    VllmFlag(("--kv-cache-dtype",), "value", "the KV cache is kept in the model's dtype (no fp8 cache)",
             _one_of("auto")),
    VllmFlag(("--rope-scaling",), "value", "it would change the model; edit config.json instead", _never),
    VllmFlag(("--rope-theta",), "value", "it would change the model; edit config.json instead", _never),
    VllmFlag(("--hf-overrides",), "value", "it would change the model; edit config.json instead", _never),
    VllmFlag(("--hf-config-path",), "value", "the config is read from the model path", _never),
    VllmFlag(("--speculative-config",), "value", "no speculative decoding", _never),
    VllmFlag(("--enable-lora",), "bool", "no LoRA adapters", _false),
    VllmFlag(("--lora-modules",), "list", "no LoRA adapters", _never),
    VllmFlag(("--enable-prompt-embeds",), "bool", "prompts are text or token ids", _false),
    VllmFlag(("--kv-transfer-config",), "value", "no disaggregated prefill", _never),
    VllmFlag(("--headless",), "bool", "other nodes run `npu-infer worker`", _false),
    VllmFlag(("--worker-cls",), "value", "no custom worker code is loaded", _one_of("auto")),
    VllmFlag(("--worker-extension-cls",), "value", "no custom worker code is loaded", _never),
    VllmFlag(("--scheduler-cls",), "value", "no custom scheduler code is loaded", _never),
    VllmFlag(("--middleware",), "value", "no custom ASGI middleware is imported", _never),
    VllmFlag(("--return-tokens-as-token-ids",), "bool", "it would change the logprobs' token strings", _false),
    VllmFlag(("--enable-force-include-usage",), "bool", "usage is sent as OpenAI's stream_options ask", _false),
)


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    """One group of every flag in VLLM_FLAGS; a flag not given leaves no attribute (default SUPPRESS)."""
    group = parser.add_argument_group(
        "vLLM flags without effect here",
        "accepted with one warning line each, or refused with the reason (see README, Coming from vLLM)")
    for flag in VLLM_FLAGS:
        text = ("refused: " if flag.always_refused else "no effect: ") + flag.why
        group.add_argument(*flag.flags, dest=flag.dest, default=argparse.SUPPRESS, help=text, **_KINDS[flag.kind])


def check_vllm_flags(args: argparse.Namespace) -> list[str]:
    """The warning line of each accepted flag that was given (also logged); ValueError for a refused one."""
    given = [(flag, getattr(args, flag.dest)) for flag in VLLM_FLAGS if hasattr(args, flag.dest)]
    return _judge([(flag, value, _shown(flag, value)) for flag, value in given])


FLAGS_BY_NAME = {flag.name: flag for flag in VLLM_FLAGS}


def check_vllm_kwargs(kwargs: dict[str, Any]) -> list[str]:
    """The same for vLLM's LLM(...) keyword arguments (`enforce_eager=True`); the caller refuses unknown names."""
    return _judge([(FLAGS_BY_NAME[name], value, f"{name}={value!r}") for name, value in kwargs.items()])


def _judge(given: list[tuple[VllmFlag, Any, str]]) -> list[str]:
    """Raise ValueError for the first refused value; log and return one warning line per accepted one."""
    warnings = []
    for flag, value, shown in given:
        if flag.harmless is not None and not _accepts(flag, value):
            raise ValueError(f"{shown} is not supported: {flag.why}")
        warnings.append(f"{shown} is accepted for vLLM compatibility and has no effect here: {flag.why}")
    for line in warnings:
        logger.warning(line)
    return warnings


def _accepts(flag: VllmFlag, value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    try:
        return all(flag.harmless(v) for v in values)
    except ValueError:  # e.g. a number that does not parse
        return False


def _shown(flag: VllmFlag, value: Any) -> str:
    name = flag.flags[0]
    if flag.kind == "bool":
        return name if value else "--no-" + name[2:]
    if value in ("", None):
        return name
    return f"{name} {' '.join(map(str, value)) if isinstance(value, list) else value}"
