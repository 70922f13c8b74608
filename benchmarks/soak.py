"""Soak test: a real server for N minutes at concurrency C under a hostile mix, then what it served and what it left.

    python benchmarks/soak.py --minutes 30 --concurrency 64 -- --device cpu --num-gpu-blocks-override 256
    python benchmarks/soak.py --base-url http://127.0.0.1:8000 --server-pid 1234 --minutes 5

Starts `python -m npu_infer.api.server` with the arguments after `--` (its default model unless --model is among
them) on a free port, or uses --base-url (and --server-pid for RSS). Each of C client threads loops over a
weighted mix (--mix): good completions and chat (streamed or not), malformed requests (bad JSON, the issue's
top_k, an unknown role, a lone surrogate, a prompt past max_model_len, n past the cap), mid-stream disconnects,
large-n requests, slow readers, and echo + logprobs + prompt_logprobs (which preemption recomputes). Give the
server a KV cache small enough to preempt (--num-gpu-blocks-override).

Prints requests served, errors by class, the 5xx count (target 0), p50/p99 latency of good requests, the server's
RSS after warm-up and at the end, preemptions and KV blocks in use after the run (target 0, from /metrics), then
one JSON line with every number (also written to --json-out). Standard library only."""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEM = "Once upon a time in a small village by the sea there lived"

# scenario -> (weight, what a healthy server answers: "ok" for 200, "4xx" for a refusal)
MIX = {"completion": 4, "chat": 3, "stream": 3, "malformed": 3, "disconnect": 2, "large_n": 1, "slow_reader": 1,
       "echo_logprobs": 1}


# ---- one request per scenario -----------------------------------------------------------------------------------
class Client:
    def __init__(self, base_url: str, rng: random.Random, max_tokens: int, max_model_len: int):
        parsed = urllib.parse.urlparse(base_url)
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.rng, self.max_tokens, self.max_model_len = rng, max_tokens, max_model_len

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=600)

    def _post(self, path: str, body: bytes | dict) -> tuple[int, bytes]:
        conn = self._conn()
        try:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            conn.request("POST", path, data, {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def _prompt(self) -> str:
        return STEM + " " + " ".join(self.rng.choice(["a", "king", "dog", "ran", "far", "blue"])
                                     for _ in range(self.rng.randint(4, 60)))

    def completion(self) -> int:
        return self._post("/v1/completions", {"prompt": self._prompt(), "temperature": self.rng.choice([0, 0.8]),
                                              "max_tokens": self.rng.randint(4, self.max_tokens), "top_p": 0.95})[0]

    def chat(self) -> int:
        return self._post("/v1/chat/completions", {"messages": [{"role": "user", "content": self._prompt()}],
                                                   "max_tokens": self.rng.randint(4, self.max_tokens)})[0]

    def large_n(self) -> int:
        return self._post("/v1/completions", {"prompt": self._prompt(), "n": 8, "max_tokens": 12,
                                              "temperature": 1.0, "seed": self.rng.randint(0, 2**63 - 1)})[0]

    def echo_logprobs(self) -> int:
        return self._post("/v1/completions", {"prompt": self._prompt(), "max_tokens": 16, "echo": True,
                                              "logprobs": 2, "prompt_logprobs": 1, "ignore_eos": True})[0]

    def malformed(self) -> int:
        bodies = [b'{"prompt": "hi", "max_tokens', b"[1, 2]",
                  {"prompt": "hi", "temperature": 1, "top_k": 100000000000000000000},
                  {"messages": [{"role": "wizard", "content": "hi"}]},
                  {"messages": [{"role": "user"}]},
                  b'{"prompt": "\\ud800"}',
                  {"prompt": "word " * (2 * self.max_model_len), "max_tokens": 4},
                  {"prompt": "hi", "n": 10_000},
                  {"prompt": "hi", "seed": 2**64},
                  {"prompt": "hi", "stop_token_ids": [10**9]}]
        body = self.rng.choice(bodies)
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        return self._post(path, body)[0]

    def _stream(self, body: dict, chunks_to_read: int | None, pause: float) -> int:
        """Read `chunks_to_read` SSE lines (None: all), pausing between reads; then close the connection."""
        conn = self._conn()
        try:
            conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}).encode(),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                response.read()
                return response.status
            read = 0
            while chunks_to_read is None or read < chunks_to_read:
                line = response.fp.readline()
                if not line:
                    break
                if line.startswith(b"data: "):
                    read += 1
                    if b'"error"' in line:
                        return 500 if b'"code": 500' in line or b'"code":500' in line else 503
                    if line.strip() == b"data: [DONE]":
                        break
                    time.sleep(pause)
            return 200
        finally:
            conn.close()  # mid-stream for disconnects: the server must abort and free the blocks

    def stream(self) -> int:
        return self._stream({"prompt": self._prompt(), "max_tokens": self.rng.randint(4, self.max_tokens)}, None, 0)

    def disconnect(self) -> int:
        return self._stream({"prompt": self._prompt(), "max_tokens": self.max_tokens, "ignore_eos": True},
                            self.rng.randint(1, 4), 0)

    def slow_reader(self) -> int:
        return self._stream({"prompt": self._prompt(), "max_tokens": self.max_tokens, "ignore_eos": True}, None, 0.2)


# ---- the run ----------------------------------------------------------------------------------------------------
class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_class: dict[str, Counter] = {name: Counter() for name in MIX}
        self.latencies: list[float] = []
        self.exceptions: Counter = Counter()

    def add(self, scenario: str, status: int | str, seconds: float) -> None:
        with self.lock:
            self.by_class[scenario][str(status)] += 1
            if status == 200 and scenario in ("completion", "chat", "stream", "large_n", "echo_logprobs"):
                self.latencies.append(seconds)


def client_loop(base_url: str, seed: int, deadline: float, tally: Tally, args) -> None:
    rng = random.Random(seed)
    client = Client(base_url, rng, args.max_tokens, args.max_model_len)
    names, weights = list(MIX), [MIX[n] for n in MIX]
    while time.monotonic() < deadline:
        scenario = rng.choices(names, weights)[0]
        start = time.monotonic()
        try:
            status: int | str = getattr(client, scenario)()
        except (OSError, http.client.HTTPException) as exc:
            status = f"exception:{type(exc).__name__}"
            with tally.lock:
                tally.exceptions[f"{scenario}:{type(exc).__name__}"] += 1
        tally.add(scenario, status, time.monotonic() - start)


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def metrics(base_url: str) -> dict[str, float]:
    parsed = urllib.parse.urlparse(base_url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name.split("{")[0]] = values.get(name.split("{")[0], 0.0) + float(value)
    return values


def wait_idle(base_url: str, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base_url)
        if (m.get("npu_infer:kv_cache_blocks_used", 0) == 0 and m.get("vllm:num_requests_running", 0) == 0
                and m.get("vllm:num_requests_waiting", 0) == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def start_server(server_args: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "npu_infer.api.server", "--host", "127.0.0.1", "--port", str(port),
           "--disable-log-requests", "--disable-uvicorn-access-log", *server_args]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become ready")


def run(args, base_url: str, pid: int | None) -> dict:
    # Warm-up: a few requests of each kind, so RSS at start includes what steady state needs.
    warm = Tally()
    client_threads = [threading.Thread(target=client_loop, args=(base_url, 10_000 + i, time.monotonic() + args.warmup,
                                                                 warm, args)) for i in range(min(8, args.concurrency))]
    for t in client_threads:
        t.start()
    for t in client_threads:
        t.join()
    wait_idle(base_url)
    rss_start = rss_bytes(pid)
    tally = Tally()
    start = time.monotonic()
    deadline = start + args.minutes * 60
    client_threads = [threading.Thread(target=client_loop, args=(base_url, args.seed + i, deadline, tally, args),
                                       daemon=True) for i in range(args.concurrency)]
    for t in client_threads:
        t.start()
    samples = []  # (minutes, RSS MiB) each minute: a leak climbs steadily, a high-water mark levels off
    while any(t.is_alive() for t in client_threads):
        time.sleep(1)
        minute = int((time.monotonic() - start) // 60)
        if minute > len(samples) - 1 and minute * 60 <= args.minutes * 60 and (rss := rss_bytes(pid)):
            samples.append((minute, round(rss / 2**20, 1)))
    for t in client_threads:
        t.join()
    elapsed = time.monotonic() - start
    after = wait_idle(base_url)
    rss_end = rss_bytes(pid)
    healthy = Counter()
    for scenario, statuses in tally.by_class.items():
        for status, count in statuses.items():
            healthy["served" if status == "200" else status] += count
    five_xx = sum(c for s in tally.by_class.values() for st, c in s.items() if st.startswith("5"))
    lat = sorted(tally.latencies)
    return {
        "minutes": round(elapsed / 60, 2), "concurrency": args.concurrency,
        "requests": sum(sum(s.values()) for s in tally.by_class.values()),
        "served_200": healthy["served"], "by_class": {k: dict(v) for k, v in tally.by_class.items()},
        "client_exceptions": dict(tally.exceptions), "5xx": five_xx,
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
        "rss_start_mib": round(rss_start / 2**20, 1) if rss_start else None,
        "rss_end_mib": round(rss_end / 2**20, 1) if rss_end else None,
        "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2) if rss_start and rss_end else None,
        "rss_each_minute_mib": samples,
        "kv_blocks_in_use_after": after.get("npu_infer:kv_cache_blocks_used"),
        "requests_running_after": after.get("vllm:num_requests_running"),
        "preemptions": after.get("vllm:num_preemptions_total"),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of warm-up before RSS is read")
    p.add_argument("--max-tokens", type=int, default=48, help="upper bound of max_tokens in the mix")
    p.add_argument("--max-model-len", type=int, default=512, help="the server's, for the too-long prompt")
    p.add_argument("--base-url", default=None, help="a running server instead of starting one")
    p.add_argument("--server-pid", type=int, default=None, help="its pid, for RSS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default="soak-server.log", help="the started server's log")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    proc = None
    if args.base_url is None:
        proc, base_url = start_server(server_args, Path(args.log))
        pid = proc.pid
    else:
        base_url, pid = args.base_url, args.server_pid
    try:
        result = run(args, base_url, pid)
    finally:
        if proc is not None:
            proc.terminate()
            result_code = proc.wait(120)
    if proc is not None:
        result["server_exit_code"] = result_code
    print(f"soak: {result['minutes']} min at concurrency {result['concurrency']}: {result['requests']} requests, "
          f"{result['served_200']} served (200)")
    for scenario, statuses in result["by_class"].items():
        print(f"  {scenario:14s} " + ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items())))
    print(f"5xx: {result['5xx']}; client-side exceptions: {result['client_exceptions'] or 0}")
    print(f"latency of good requests: p50 {result['latency_p50_s']} s, p99 {result['latency_p99_s']} s")
    print(f"server RSS: {result['rss_start_mib']} MiB after warm-up -> {result['rss_end_mib']} MiB at the end "
          f"({result['rss_growth_pct']} %); each minute: "
          f"{' '.join(str(mib) for _, mib in result['rss_each_minute_mib'])}")
    print(f"after the run: {result['kv_blocks_in_use_after']} KV blocks in use, "
          f"{result['requests_running_after']} requests running; {result['preemptions']} preemptions in all")
    line = json.dumps(result)
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
