"""Each engine option is defined once (EngineConfig's fields): the server and `npu-infer worker` read it alike."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from npu_infer.api.args import engine_config_from_args, parse_serve_args
from npu_infer.api.args import make_parser as server_parser
from npu_infer.config import EngineConfig
from npu_infer.engine_args import engine_config_kwargs, flag_fields
from npu_infer.worker.worker_cli import make_parser as worker_parser

# Set from --structured-outputs-config, or found by resolve(): no flag of their own.
NOT_FLAGS = {"structured_outputs_backend", "structured_outputs_disable_any_whitespace", "hf_config", "torch_dtype",
             "model_path"}


def flag_differences(server: argparse.ArgumentParser, worker: argparse.ArgumentParser) -> list[str]:
    """Every worker flag as the server defines it: spellings, action, type, choices, nargs and default."""
    served = {a.dest: a for a in server._actions}
    differences = []
    for action in worker._actions:
        if action.dest == "help":
            continue
        twin = served.get(action.dest)
        if twin is None:
            differences.append(f"{action.dest}: not a server flag")
            continue
        for attr in ("option_strings", "type", "choices", "nargs", "default", "help"):
            if getattr(action, attr) != getattr(twin, attr):
                differences.append(f"{action.dest}.{attr}: {getattr(action, attr)!r} != {getattr(twin, attr)!r}")
        if type(action) is not type(twin):
            differences.append(f"{action.dest}: {type(action).__name__} != {type(twin).__name__}")
    return differences


def test_worker_flags_are_the_servers():
    assert flag_differences(server_parser(), worker_parser()) == []


def test_the_comparison_sees_a_hand_written_flag():
    """The issue this replaced: --enable-prefix-caching a --flag/--no-flag pair on one command line, a switch on the
    other."""
    by_hand = argparse.ArgumentParser()
    by_hand.add_argument("--enable-prefix-caching", action="store_true")
    assert flag_differences(server_parser(), by_hand) == [
        "enable_prefix_caching.option_strings: ['--enable-prefix-caching'] != "
        "['--enable-prefix-caching', '--no-enable-prefix-caching']",
        "enable_prefix_caching.default: False != True",
        "enable_prefix_caching.help: None != \"reuse the KV blocks of prompts that share a prefix with earlier ones "
        "(on by default, as in vLLM's V1 engine; --no-enable-prefix-caching turns it off)\"",
        "enable_prefix_caching: _StoreTrueAction != BooleanOptionalAction"]


def test_every_engine_setting_is_a_flag():
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert fields - {f.name for f in flag_fields()} == NOT_FLAGS


def test_worker_refuses_what_the_server_refuses():
    with pytest.raises(SystemExit) as exit_info:
        worker_parser().parse_known_args(["--model", "m", "--dtype", "int8"])
    assert exit_info.value.code == 2


def test_both_command_lines_give_the_same_config():
    argv = ["--model", "/m", "-tp", "2", "--max-model-len", "32k", "--kv-cache-memory-bytes", "4G",
            "--no-enable-prefix-caching", "--structured-outputs-config", '{"backend": "guidance"}', "-q",
            "bitsandbytes", "--served-model-name", "a", "b", "--override-generation-config", '{"top_k": 5}']
    worker_args, ignored = worker_parser().parse_known_args(argv + ["--port", "9000"])
    assert ignored == ["--port", "9000"]
    assert EngineConfig(**engine_config_kwargs(worker_args)) == engine_config_from_args(parse_serve_args(argv))
