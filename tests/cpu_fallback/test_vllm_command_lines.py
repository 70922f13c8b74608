"""vLLM's command lines, unchanged: the model positional, vLLM's spellings, its harmless flags accepted with one
warning line each, the ones that would change results refused with the reason."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import requests

from npu_infer.api.args import api_keys, engine_config_from_args, log_requests, parse_serve_args, served_model_names
from npu_infer.api.vllm_flags import VLLM_FLAGS, check_vllm_flags
from npu_infer.config import EngineConfig, human_readable_int, parse_bytes
from tests.api.server_process import FAST_FLAGS, REPO, ServerProcess


def test_model_positional_as_vllm_serve():
    assert parse_serve_args(["/m", "--port", "8001"]).model == "/m"
    assert parse_serve_args(["--port", "8001", "/m", "-tp", "1"]).model == "/m"
    assert parse_serve_args(["--model", "/m"]).model == "/m"
    assert parse_serve_args(["/m", "--model", "/m"]).model == "/m"
    with pytest.raises(SystemExit) as exit_info:
        parse_serve_args(["/m", "--model", "/other"])
    assert exit_info.value.code == 2


def test_underscored_flags_as_vllm_reads_them():
    args = parse_serve_args(["--model", "/m", "--max_model_len", "512", "--max_num_seqs=8", "--served_model_name",
                             "a_b"])
    assert (args.max_model_len, args.max_num_seqs, args.served_model_name) == (512, 8, ["a_b"])


def test_config_file_as_vllms(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("max_model_len: 1k\nenforce-eager: true\nenable-prefix-caching: false\n"
                      "served-model-name: [a, b]\ncompilation-config: {level: 3}\nport: 9000\n")
    args = parse_serve_args(["/m", "--config", str(config), "--port", "9001"])
    assert (args.model, args.max_model_len, args.enable_prefix_caching, args.served_model_name) == (
        "/m", 1000, False, ["a", "b"])
    assert args.port == 9001  # the command line wins over the file
    assert args.vllm_enforce_eager is True and json.loads(args.vllm_compilation_config) == {"level": 3}
    assert parse_serve_args(["/cli-model", "--config", str(config)]).served_model_name == ["a", "b"]
    config.write_text("- not a mapping\n")
    with pytest.raises(SystemExit):
        parse_serve_args(["--config", str(config)])


@pytest.mark.parametrize("text, value", [("32k", 32000), ("32K", 32768), ("1M", 2**20), ("1m", 10**6),
                                         ("25.6k", 25600), ("2048", 2048), ("auto", None), ("-1", None)])
def test_max_model_len_suffixes_as_vllm(text, value):
    assert parse_serve_args(["--max-model-len", text]).max_model_len == value


def test_human_readable_int_refuses_what_vllm_refuses():
    with pytest.raises(ValueError, match="did you mean 2.5k"):
        human_readable_int("2.5K")
    with pytest.raises(SystemExit):
        parse_serve_args(["--max-model-len", "lots"])


def test_kv_cache_memory_bytes_is_vllms_name():
    args = parse_serve_args(["--model", "/m", "--kv-cache-memory-bytes", "4G"])
    assert engine_config_from_args(args).kv_cache_memory == 4 * 2**30  # vLLM: upper-case suffixes are binary
    assert parse_bytes("4g") == 4 * 10**9 and parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("512MB") == 512e6


def test_served_model_names_and_api_keys(monkeypatch):
    args = parse_serve_args(["/m", "--served-model-name", "first", "second", "--api-key", "k1", "k2"])
    assert served_model_names(args, engine_config_from_args(args)) == ["first", "second"]
    assert engine_config_from_args(args).served_model_name == "first"
    assert api_keys(args) == ["k1", "k2"]
    # The default model also answers to its file name, the name README's first request uses.
    default = parse_serve_args([])
    assert served_model_names(default, EngineConfig(model="x.gguf", served_model_name="SmolLM2-135M-Instruct")) == [
        "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_prefix_caching_on_by_default_as_vllm_v1():
    assert parse_serve_args([]).enable_prefix_caching is True
    assert engine_config_from_args(parse_serve_args(["/m", "--no-enable-prefix-caching"])).enable_prefix_caching is False


def test_request_logging_follows_vllm():
    assert log_requests(parse_serve_args([])) is False  # vLLM's default
    assert log_requests(parse_serve_args(["--enable-log-requests"])) is True
    assert log_requests(parse_serve_args(["--enable-log-requests", "--disable-log-requests"])) is False


HARMLESS = ["--enforce-eager", "--swap-space", "4", "--enable-chunked-prefill", "--disable-custom-all-reduce",
            "--distributed-executor-backend", "mp", "--disable-frontend-multiprocessing", "--revision", "main",
            "--download-dir", "/tmp/models", "--tokenizer-mode", "auto", "--compilation-config", '{"level": 3}',
            "-O3", "--max-num-partial-prefills", "1", "--no-enable-chunked-prefill"]


def test_harmless_vllm_flags_each_warn_once(caplog):
    args = parse_serve_args(["/m", *HARMLESS])
    with caplog.at_level(logging.WARNING, logger="npu_infer.api.args"):
        lines = check_vllm_flags(args)
    assert len(lines) == len(caplog.records) == 11  # one line per flag (-O3 and --no-: the last spelling wins)
    for flag in ("--enforce-eager", "--swap-space 4", "--no-enable-chunked-prefill", "--disable-custom-all-reduce",
                 "--distributed-executor-backend mp", "--revision main", "--download-dir /tmp/models",
                 "--tokenizer-mode auto", "--compilation-config 3"):
        assert any(line.startswith(flag + " is accepted") for line in lines), flag
    assert all(len(line.splitlines()) == 1 for line in lines)


@pytest.mark.parametrize("argv, message", [
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8 is not supported: the KV cache is kept in the model's dtype"),
    (["--tokenizer-mode", "mistral"], "--tokenizer-mode mistral is not supported"),
    (["--enable-lora"], "--enable-lora is not supported: no LoRA adapters"),
    (["--speculative-config", "{}"], "--speculative-config {} is not supported"),
    (["-dp", "2"], "--data-parallel-size 2 is not supported"),
    (["--max-logprobs", "50"], "--max-logprobs 50 is not supported"),
])
def test_flags_that_would_change_results_are_refused(argv, message):
    with pytest.raises(ValueError) as info:
        engine_config_from_args(parse_serve_args(["/m", *argv]))
    assert str(info.value).startswith(message)


def test_accepted_values_of_value_dependent_flags():
    lines = check_vllm_flags(parse_serve_args(["/m", "--kv-cache-dtype", "auto", "--no-enable-lora", "-dp", "1",
                                               "--max-logprobs", "20"]))
    assert len(lines) == 4


def test_every_table_flag_parses():
    """Each flag of the table reads a value of its kind (no argparse conflicts with our own flags)."""
    for flag in VLLM_FLAGS:
        argv = {"value": [flag.flags[0], "1"], "bool": [flag.flags[0]], "list": [flag.flags[0], "1", "2"],
                "optional": [flag.flags[0]]}[flag.kind]
        assert hasattr(parse_serve_args(["/m", *argv]), flag.dest), flag.flags


def test_refused_flag_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, "-m", "npu_infer.cli", "serve", "/nonexistent", "--kv-cache-dtype", "fp8"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: --kv-cache-dtype fp8 is not supported: the KV cache is kept in the model's dtype (no fp8 cache)"]


@pytest.fixture(scope="module")
def model_with_generation_config(tiny_chat_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a generation_config.json: greedy, 5 new tokens, and top_k at transformers' default
    (which vLLM drops, as it is no difference from the default)."""
    out = tmp_path_factory.mktemp("tiny-gen-config")
    shutil.copytree(tiny_chat_model_dir, out, dirs_exist_ok=True)
    (out / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 5, "top_k": 50,
                                                            "do_sample": True}))
    return out


@pytest.fixture(scope="module")
def vllm_server(model_with_generation_config, tmp_path_factory):
    """The tiny model served with a vLLM command line: positional model, its flags, two names, two keys."""
    proc = ServerProcess([str(model_with_generation_config), "--served-model-name", "tiny", "tiny-alias", "--api-key", "k1",
                          "k2", "--max_model_len", "0.5k", *HARMLESS, *FAST_FLAGS],
                         tmp_path_factory.mktemp("vllm-server") / "server.log", env={"VLLM_API_KEY": "unused"})
    yield proc
    proc.stop()


def test_vllm_command_line_serves(vllm_server):
    log = vllm_server.log()
    assert log.count("is accepted for vLLM compatibility") == 11
    for key in ("k1", "k2"):
        client = openai.OpenAI(base_url=vllm_server.url + "/v1", api_key=key, max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]
        out = client.completions.create(model="tiny-alias", prompt="hi", max_tokens=3)
        assert out.model == "tiny-alias" and out.usage.completion_tokens == 3  # vLLM names the model asked for
        assert client.models.list().data[0].max_model_len == 500
    # The flags' keys replace the environment's.
    assert requests.get(vllm_server.url + "/v1/models", headers={"Authorization": "Bearer unused"}).status_code == 401


# ---- HTTP: CORS, root path, TLS, request logs, prompt_tokens_details -------------------------------------------
ORIGIN = "https://app.example"
# The fixtures' own self-signed certificate: these tests check other things than the certificate.
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made now with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return d / "key.pem", d / "cert.pem"


@pytest.fixture(scope="module")
def https_server(tiny_chat_model_dir, tmp_path_factory, cert):
    key, certfile = cert
    proc = ServerProcess(["--model", str(tiny_chat_model_dir), "--ssl-keyfile", str(key), "--ssl-certfile",
                          str(certfile), "--root-path", "/llm", "--allowed-origins", json.dumps([ORIGIN]),
                          "--allowed-methods", '["GET", "POST"]', "--allow-credentials", "--enable-log-requests",
                          "--max-log-len", "5", "--enable-prompt-tokens-details", "--enable-prefix-caching",
                          *FAST_FLAGS], tmp_path_factory.mktemp("https-server") / "server.log")
    yield proc
    proc.stop()


def test_https_with_the_given_certificate(https_server, cert):
    _, certfile = cert
    r = requests.post(https_server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=120,
                      verify=str(certfile))  # the server's certificate checks out against the file
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    with pytest.raises(requests.exceptions.SSLError):  # an unknown certificate is refused by a checking client
        requests.get(https_server.url + "/health", timeout=10)
    with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP is not served
        requests.get(https_server.url.replace("https", "http") + "/health", timeout=10)


def test_cors_follows_the_flags(https_server):
    def preflight(origin: str, method: str = "POST") -> requests.Response:
        return requests.options(https_server.url + "/v1/completions", verify=False, timeout=10, headers={
            "Origin": origin, "Access-Control-Request-Method": method})
    ok = preflight(ORIGIN)
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert ok.headers["access-control-allow-credentials"] == "true"
    assert preflight("https://other.example").status_code == 400
    assert preflight(ORIGIN, "DELETE").status_code == 400
    simple = requests.get(https_server.url + "/v1/models", verify=False, timeout=10, headers={"Origin": ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ORIGIN


def test_root_path_behind_a_proxy(https_server):
    """A proxy that keeps the prefix and one that strips it both reach the endpoints; the docs know the prefix."""
    for path in ("/llm/v1/models", "/v1/models"):
        assert requests.get(https_server.url + path, verify=False, timeout=10).status_code == 200, path
    docs = requests.get(https_server.url + "/llm/docs", verify=False, timeout=10).text
    assert "/llm/openapi.json" in docs


def test_request_log_cut_at_max_log_len(https_server):
    requests.post(https_server.url + "/v1/completions", verify=False, timeout=120,
                  json={"prompt": "abcdefghij", "max_tokens": 1}).raise_for_status()
    lines = [line for line in https_server.log().splitlines() if "received request cmpl-" in line]
    assert lines and "prompt: 'abcde'," in lines[-1], lines


def test_prompt_tokens_details_counts_prefix_cache_hits(https_server):
    """The second request's shared 2-block prefix comes from the cache: cached_tokens says how many tokens."""
    prompt = list(range(10, 60))  # 50 token ids: three full 16-token blocks
    usages = []
    for _ in range(2):
        r = requests.post(https_server.url + "/v1/completions", verify=False, timeout=120,
                          json={"prompt": prompt, "max_tokens": 1})
        usages.append(r.json()["usage"])
    assert usages[0]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usages[1]["prompt_tokens_details"] == {"cached_tokens": 48}
    body = {"messages": [{"role": "user", "content": "hi " * 40}], "max_tokens": 1}
    first = requests.post(https_server.url + "/v1/chat/completions", verify=False, timeout=120, json=body).json()
    streamed = requests.post(https_server.url + "/v1/chat/completions", verify=False, timeout=120, json={
        **body, "stream": True, "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {") and '"usage"' in line]
    usage = events[-1]["usage"]
    assert first["usage"]["prompt_tokens"] == usage["prompt_tokens"] > 32
    assert usage["prompt_tokens_details"] == {"cached_tokens": (usage["prompt_tokens"] - 1) // 16 * 16}


def test_generation_config_fills_what_the_request_leaves_out(vllm_server):
    client = openai.OpenAI(base_url=vllm_server.url + "/v1", api_key="k1", max_retries=0, timeout=120)
    prompt = "The capital of France is"
    free = client.completions.create(model="tiny", prompt=prompt, extra_body={"ignore_eos": True})
    assert free.usage.completion_tokens == 5  # max_new_tokens, not OpenAI's 16
    greedy = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert free.choices[0].text == greedy.choices[0].text  # temperature 0 from the file
    assert client.completions.create(model="tiny", prompt=prompt, max_tokens=2,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens == 2
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 5
