"""Start several OpenAI-compatible servers one after another and benchmark each the same way.

    python benchmarks/compare_serving.py --preset smollm2 --concurrency 1,4,16
    python benchmarks/compare_serving.py --concurrency 1,4 \
        --server 'vllm-cpu=VLLM_CPU_KVCACHE_SPACE=2 /work/vllm-venv/bin/python \
                  -m vllm.entrypoints.openai.api_server --model /work/smollm2-hf --port {port}' \
        --server 'npu_infer={python} -m npu_infer.api.server --model /work/smollm2-hf --port {port}'

Each `label=command` runs through the shell in its own process group, with {port} (--port, default
8100) and {python} (this interpreter) filled in and its output in OUT_DIR/<label>.log. Time-to-ready
runs from the launch to the first 200 from GET /v1/models. Then benchmarks/serve.py runs once per
concurrency with the same seed (so every server gets the same prompts), and the whole group is
killed (SIGTERM, then SIGKILL) before the next server starts. Prints one table, and the ratios of
each server to the first one.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PRESETS: dict[str, list[str]] = {
    # vLLM-CPU first: it is the baseline the ratios are taken against (see benchmarks/README.md)
    "smollm2": [
        "vllm-cpu=VLLM_CPU_KVCACHE_SPACE=2 /work/vllm-venv/bin/python"
        " -m vllm.entrypoints.openai.api_server -tp 1 --model /work/smollm2-hf"
        " --served-model-name smollm2 --dtype bfloat16 --port {port} --disable-log-stats",
        "npu_infer={python} -m npu_infer.api.server --model /work/smollm2-hf"
        " --served-model-name smollm2 --dtype bfloat16 --port {port} --kv-cache-memory 2GiB"
        " --disable-log-stats --disable-log-requests",
    ],
}


def http_ok(url: str, api_key: str | None) -> bool:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def kill_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the server's whole process group, SIGKILL whatever is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or its zombie keeps the group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    proc.poll()


def bench_server(label: str, command: str, args: argparse.Namespace) -> dict[str, Any]:
    """Launches one server, waits for it, runs serve.py at each concurrency, and stops it."""
    if port_in_use(args.port):
        return {"label": label, "error": f"port {args.port} is already in use before launch"}
    base = f"http://127.0.0.1:{args.port}"
    log = open(args.out_dir / f"{label}.log", "w")
    cmd = command.format(port=args.port, python=sys.executable)
    print(f"[{label}] $ {cmd}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=True, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    out: dict[str, Any] = {"label": label, "command": cmd, "runs": {}}
    try:
        while not http_ok(f"{base}/v1/models", args.api_key):
            if proc.poll() is not None:
                out["error"] = f"exited with {proc.returncode} before ready; see {log.name}"
                return out
            if time.perf_counter() - t0 > args.ready_timeout:
                out["error"] = f"not ready after {args.ready_timeout:.0f}s; see {log.name}"
                return out
            time.sleep(0.25)
        out["ready_s"] = round(time.perf_counter() - t0, 2)
        print(f"[{label}] ready in {out['ready_s']} s", flush=True)
        for c in args.concurrency:
            json_out = args.out_dir / f"{label}-c{c}.json"
            cmd_bench = [
                sys.executable, str(HERE / "serve.py"), "--base-url", base, "--label", label,
                "--max-concurrency", str(c), "--num-prompts", str(args.num_prompts or 4 * c),
                "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                "--dataset", args.dataset, "--seed", str(args.seed), "--warmup", str(args.warmup),
                "--json-out", str(json_out),
            ] + (["--api-key", args.api_key] if args.api_key else [])
            rc = subprocess.run(cmd_bench, stdout=subprocess.DEVNULL, stderr=log).returncode
            out["runs"][c] = json.loads(json_out.read_text()) if json_out.exists() else {"error": f"rc {rc}"}
            run = out["runs"][c]
            print(f"[{label}] c={c}: {run.get('output_throughput')} tok/s, "
                  f"TTFT {run.get('mean_ttft_ms')} ms, failed {run.get('failed')}", flush=True)
        return out
    finally:
        kill_group(proc)
        log.close()
        for _ in range(100):  # the next server needs the port
            if not port_in_use(args.port):
                break
            time.sleep(0.1)


def ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"


def print_table(results: list[dict[str, Any]], concurrency: list[int]) -> None:
    cols = ["label", "conc", "out tok/s", "TTFT mean", "TTFT p50", "TTFT p99", "TPOT mean",
            "ready s", "failed"]
    keys = ["output_throughput", "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms"]
    print("\n" + "".join(f"{c:>12}" for c in cols))
    for r in results:
        if "error" in r and not r.get("runs"):
            print(f"{r['label']:>12}  {r['error']}")
            continue
        for c in concurrency:
            run = r["runs"].get(c, {})
            vals = [run.get(k, "-") for k in keys] + [r.get("ready_s", "-"), run.get("failed", "-")]
            print(f"{r['label']:>12}{c:>12}" + "".join(f"{v:>12}" for v in vals))
    base = results[0]
    for r in results[1:]:
        if not r.get("runs"):
            continue
        print(f"\n{r['label']} / {base['label']}: ready {ratio(r.get('ready_s'), base.get('ready_s'))}")
        for c in concurrency:
            a, b = r.get("runs", {}).get(c, {}), base.get("runs", {}).get(c, {})
            print(f"  c={c:<4} out tok/s {ratio(a.get('output_throughput'), b.get('output_throughput'))}"
                  f"  TTFT mean {ratio(a.get('mean_ttft_ms'), b.get('mean_ttft_ms'))}"
                  f"  TTFT p99 {ratio(a.get('p99_ttft_ms'), b.get('p99_ttft_ms'))}"
                  f"  TPOT mean {ratio(a.get('mean_tpot_ms'), b.get('mean_tpot_ms'))}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", action="append", default=[], metavar="LABEL=COMMAND")
    p.add_argument("--preset", choices=sorted(PRESETS), help="built-in servers, run after any --server")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--num-prompts", type=int, default=0, help="per concurrency; default 4 x concurrency")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dataset", choices=("random-ids", "random-text"), default="random-ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--port", type=int, default=8100, help="where each server is told to listen")
    p.add_argument("--api-key")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--out-dir", type=Path, default=Path(".bench/compare_serving"))
    args = p.parse_args()
    servers = args.server + PRESETS.get(args.preset or "", [])
    if not servers:
        p.error("give at least one --server LABEL=COMMAND, or --preset")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # Ctrl-C / SIGTERM unwind through bench_server's `finally`, which kills the server's group
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    for spec in servers:
        label, sep, command = spec.partition("=")
        if not sep or not label or not command:
            p.error(f"--server wants LABEL=COMMAND, got {spec!r}")
        results.append(bench_server(label.strip(), command.strip(), args))
    print_table(results, args.concurrency)
    (args.out_dir / "summary.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
