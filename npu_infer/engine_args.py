"""The engine's command-line flags, generated from EngineConfig's fields (config.option), as vLLM's
EngineArgs.add_cli_args: the server (api/args.py) and `npu-infer worker` (worker/worker_cli.py) take the same ones."""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from npu_infer.config import EngineConfig

# Group key (config.option's `group`) -> the title a parser without its own group of that key gets.
GROUP_TITLES = {"model": "model", "device": "device and memory", "scheduler": "scheduler",
                "parallel": "parallelism", "structured": "structured outputs and reasoning", "limits": "limits"}
_TYPES = {"int": int, "int | None": int, "float": float, "float | None": float}  # else str (field annotations)


def flag_fields() -> list[dataclasses.Field]:
    """EngineConfig's fields that are flags, in the order --help lists them."""
    return [f for f in dataclasses.fields(EngineConfig) if "flag" in f.metadata]


def add_engine_args(parser: argparse.ArgumentParser,
                    groups: dict[str, argparse._ArgumentGroup] | None = None) -> None:
    """Add every engine flag to `parser`, each to its group (from `groups`, else a new one titled GROUP_TITLES)."""
    groups = dict(groups or {})
    for key, title in GROUP_TITLES.items():
        if key not in groups:
            groups[key] = parser.add_argument_group(title)
    groups["structured"].add_argument(
        "--structured-outputs-config", type=_structured_outputs_config, default={},
        help='JSON: {"backend": "auto|xgrammar|guidance", "disable_any_whitespace": false}; auto takes xgrammar '
             "and falls back to llguidance for what xgrammar cannot compile")
    for f in flag_fields():
        spec = f.metadata["flag"]
        kwargs: dict[str, Any] = {"default": f.default, **spec["argparse"]}
        if f.type == "bool":
            kwargs.setdefault("action", "store_true")
        elif "action" not in kwargs and "type" not in kwargs:
            kwargs["type"] = _TYPES.get(f.type, str)
        groups[spec["group"]].add_argument("--" + f.name.replace("_", "-"), *spec["aliases"], dest=f.name,
                                           help=spec["help"], **kwargs)


def engine_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig's keyword arguments from parsed engine flags: --served-model-name's first name, and the
    fields --structured-outputs-config sets (its reasoning_parser only where --reasoning-parser is not given)."""
    kwargs = {f.name: getattr(args, f.name) for f in flag_fields()}
    kwargs["served_model_name"] = args.served_model_name[0] if args.served_model_name else None
    outputs = args.structured_outputs_config
    kwargs["structured_outputs_backend"] = outputs.get("backend", "auto")
    kwargs["structured_outputs_disable_any_whitespace"] = bool(outputs.get("disable_any_whitespace"))
    kwargs["reasoning_parser"] = args.reasoning_parser or outputs.get("reasoning_parser")
    return kwargs


def _structured_outputs_config(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = {"backend": text}  # a bare backend name
    if not isinstance(value, dict) or set(value) - {"backend", "disable_any_whitespace", "reasoning_parser"}:
        raise argparse.ArgumentTypeError('expected JSON such as {"backend": "xgrammar"} (keys: backend, '
                                         "disable_any_whitespace, reasoning_parser)")
    return value
