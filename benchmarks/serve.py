"""Serving load generator for any OpenAI-compatible server (POST /v1/completions, streamed).

In the spirit of vLLM's benchmark_serving.py, with no dependencies beyond the standard library
(one thread per in-flight request, http.client, SSE parsed by hand), so it runs from any venv.

    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --num-prompts 32 \
        --max-concurrency 4 --input-len 128 --output-len 128 --dataset random-ids --label mine

--request-rate R sends requests as a Poisson process of R req/s (default inf: all at once);
--max-concurrency C caps the requests in flight; both may be given. Prompts are seeded (--seed), so
two servers benchmarked with the same flags get the same prompts. random-ids sends each prompt as a
list of token ids (exactly --input-len tokens, ids drawn from --id-range); random-text sends words
(about one token each). Warm-up requests (--warmup) use other prompts and are not measured.

Per request: TTFT (to the first token-bearing chunk), ITL (gaps between token chunks), TPOT
((latency - TTFT) / (output tokens - 1)), E2E latency; output tokens come from the `usage` chunk
(stream_options.include_usage) or, when the server sends none, from the count of token chunks.
Prints a summary, then one JSON line with every number (also written to --json-out).
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterator

WORDS = (
    "the of and to in is was for on that with as by at from his her they this are had not but "
    "which one all were when we there can an your their said each she do how will up other about "
    "out many then them these so some would make like him into time has look two more write go see "
    "number no way could people my than first water been call who oil its now find long down day "
    "did get come made may part over new sound take only little work know place year live me back "
    "give most very after thing our just name good sentence man think say great where help through "
    "much before line right too mean old any same tell boy follow came want show also around form "
    "three small set put end does another well large must big even such because turn here why ask "
    "went men read need land different home us move try kind hand picture again change off play "
    "spell air away animal house point page letter mother answer found study still learn should"
).split()

Prompt = list[int] | str


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


class Client:
    """Opens one HTTP connection per request; speaks plain JSON and server-sent events."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        url = urllib.parse.urlsplit(base_url)
        self.https, self.host = url.scheme == "https", url.hostname or "127.0.0.1"
        self.port = url.port or (443 if self.https else 80)
        self.prefix, self.timeout = url.path.rstrip("/"), timeout
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[Any, Any]:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.timeout)
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, self.prefix + path, body=data, headers=self.headers)
        return conn, conn.getresponse()

    def get_json(self, path: str) -> dict:
        conn, resp = self._request("GET", path)
        try:
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {resp.status} {resp.read(500)!r}")
            return json.loads(resp.read())
        finally:
            conn.close()

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """Yields each `data:` event as parsed JSON until [DONE] or the end of the stream."""
        conn, resp = self._request("POST", path, body)
        try:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read(500).decode(errors='replace')}")
            while line := resp.readline():
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, `event:` lines
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                yield json.loads(payload)
        finally:
            conn.close()


def make_prompts(args: argparse.Namespace, n: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    if args.dataset == "random-ids":
        lo, hi = args.id_range
        return [[rng.randrange(lo, hi) for _ in range(args.input_len)] for _ in range(n)]
    return [" ".join(rng.choice(WORDS) for _ in range(args.input_len)) for _ in range(n)]


def run_one(client: Client, args: argparse.Namespace, prompt: Prompt) -> Result:
    body: dict[str, Any] = {
        "model": args.model, "prompt": prompt, "max_tokens": args.output_len,
        "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    res, chunks, usage = Result(), 0, None
    start = last = time.perf_counter()
    try:
        for event in client.stream("/v1/completions", body):
            if "error" in event:
                raise RuntimeError(json.dumps(event["error"])[:500])
            now = time.perf_counter()
            choices = event.get("choices") or []
            # a token-bearing chunk has text, or is a mid-stream chunk (a token that decoded to no
            # text yet); an empty closing chunk that only carries finish_reason is not a token
            if any(c.get("text") or c.get("finish_reason") is None for c in choices):
                if chunks == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                chunks, last = chunks + 1, now
            if event.get("usage"):
                usage = event["usage"]
        res.latency = time.perf_counter() - start
        if chunks == 0:
            raise RuntimeError("stream ended without any token")
        res.output_tokens = int(usage["completion_tokens"]) if usage else chunks
        res.prompt_tokens = int(usage["prompt_tokens"]) if usage else (
            len(prompt) if isinstance(prompt, list) else len(prompt.split()))
        res.ok = True
    except Exception as exc:  # noqa: BLE001 -- every failure is counted, never raised
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def run_all(
    client: Client, args: argparse.Namespace, prompts: list[Prompt]
) -> tuple[list[Result], float]:
    """Sends the prompts on a Poisson schedule, at most max_concurrency in flight."""
    results: list[Result] = [Result() for _ in prompts]
    gate = threading.BoundedSemaphore(args.max_concurrency) if args.max_concurrency else None
    arrivals = random.Random(args.seed + 7)

    def work(i: int) -> None:
        try:
            results[i] = run_one(client, args, prompts[i])
        finally:
            if gate:
                gate.release()

    threads: list[threading.Thread] = []
    start = due = time.perf_counter()
    for i in range(len(prompts)):
        if args.request_rate != float("inf") and i > 0:
            due += arrivals.expovariate(args.request_rate)
            time.sleep(max(0.0, due - time.perf_counter()))
        if gate:
            gate.acquire()
        threads.append(threading.Thread(target=work, args=(i,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def pct(xs: list[float], p: float) -> float:
    """Percentile with linear interpolation (numpy's default)."""
    if not xs:
        return 0.0
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(args: argparse.Namespace, results: list[Result], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    m: dict[str, Any] = {
        "label": args.label, "base_url": args.base_url, "model": args.model, "dataset": args.dataset,
        "num_prompts": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "max_concurrency": args.max_concurrency,
        "request_rate": "inf" if args.request_rate == float("inf") else args.request_rate,
        "input_len": args.input_len, "output_len": args.output_len, "duration_s": round(duration, 3),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": round(len(ok) / duration, 4),
        "output_throughput": round(out_tokens / duration, 2),
        "total_token_throughput": round((in_tokens + out_tokens) / duration, 2),
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [g for r in ok for g in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name, xs in series.items():
        m[f"mean_{name}_ms"] = round(statistics.fmean(xs) * 1000, 3) if xs else 0.0
        m[f"p50_{name}_ms"] = round(pct(xs, 50) * 1000, 3)
        m[f"p99_{name}_ms"] = round(pct(xs, 99) * 1000, 3)
    m["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return m


def print_summary(m: dict[str, Any]) -> None:
    print(f"{'=' * 16} Serving benchmark: {m['label'] or m['base_url']} {'=' * 16}")
    for key in ("model", "completed", "failed", "duration_s", "total_input_tokens",
                "total_output_tokens", "request_throughput", "output_throughput",
                "total_token_throughput"):
        print(f"{key:<28}{m[key]}")
    print(f"{'(ms)':<8}{'mean':>12}{'p50':>12}{'p99':>12}")
    for name in ("ttft", "tpot", "itl", "e2el"):
        row = "".join(f"{m[f'{stat}_{name}_ms']:>12.2f}" for stat in ("mean", "p50", "p99"))
        print(f"{name.upper():<8}{row}")
    for err in m["errors"]:
        print(f"error: {err}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="default: the first model GET /v1/models lists")
    p.add_argument("--api-key")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-concurrency", type=int, help="most requests in flight (default: no cap)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrivals, requests/s; inf = all at once")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dataset", choices=("random-ids", "random-text"), default="random-ids")
    p.add_argument("--id-range", type=lambda s: tuple(int(x) for x in s.split(",")),
                   default=(1000, 30000), metavar="LO,HI",
                   help="token ids for random-ids are drawn from [LO, HI); fits any vocab >= 30000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first, one at a time")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may stall")
    p.add_argument("--label", default="")
    p.add_argument("--json-out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = Client(args.base_url, args.api_key, args.timeout)
    if not args.model:
        args.model = client.get_json("/v1/models")["data"][0]["id"]
    for prompt in make_prompts(args, args.warmup, args.seed + 1):
        if not (r := run_one(client, args, prompt)).ok:
            print(f"warm-up request failed: {r.error}", file=sys.stderr)
    results, duration = run_all(client, args, make_prompts(args, args.num_prompts, args.seed))
    metrics = summarize(args, results, duration)
    print_summary(metrics)
    line = json.dumps(metrics)
    print(line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    return 0 if metrics["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
