"""Prometheus metrics (GET /metrics), under vLLM's names so vLLM dashboards work; npu_infer: for what vLLM lacks.

Engine state (running / waiting, KV usage, token and prefix-cache counters, batch sizes) is read at scrape
time from the snapshot the engine thread publishes after every step; latencies are observed as they happen."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _EngineCollector:
    """Turns the engine thread's latest snapshot into gauges and counters at scrape time."""

    def __init__(self, snapshot, model_name: str):
        self.snapshot = snapshot  # callable -> dict
        self.labels = [model_name]

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["model_name"])
        g.add_metric(self.labels, value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=["model_name"])
        c.add_metric(self.labels, value)
        return c

    def collect(self):
        s = self.snapshot()
        yield self._gauge("vllm:num_requests_running", "Requests in the running batch.", s["running"])
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s["waiting"])
        yield self._gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", s["kv_usage"])
        yield self._counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            s["prefix_queries"])
        yield self._counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s["prefix_hits"])
        yield self._counter("vllm:prompt_tokens", "Prompt tokens received.", s["prompt_tokens"])
        yield self._counter("vllm:generation_tokens", "Tokens generated.", s["generation_tokens"])
        yield self._counter("vllm:num_preemptions", "Requests preempted (blocks freed, recomputed later).",
                            s["preemptions"])
        yield self._gauge("npu_infer:kv_cache_blocks_used", "KV-cache blocks held by requests.", s["blocks_used"])
        yield self._gauge("npu_infer:kv_cache_blocks_total", "KV-cache blocks in the pool.", s["blocks_total"])
        yield self._counter("npu_infer:engine_steps", "Engine steps run.", s["num_steps"])
        yield self._gauge("npu_infer:max_batch_size", "Most sequences seen in one step.", s["max_batch_size"])
        h = HistogramMetricFamily("npu_infer:step_batch_size", "Sequences per engine step.", labels=["model_name"])
        sizes = s["batch_sizes"]
        buckets, cumulative = [], 0
        for bound in BATCH_BUCKETS:
            cumulative = sum(steps for size, steps in sizes.items() if size <= bound)
            buckets.append((str(float(bound)), cumulative))
        buckets.append(("+Inf", sum(sizes.values())))
        h.add_metric(self.labels, buckets, sum_value=sum(size * steps for size, steps in sizes.items()))
        yield h


class ServerMetrics:
    """One registry per server (not the global one), so several servers can live in one process (tests)."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token (arrival to first token).",
                              labels, buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between successive tokens of a request.",
                             labels, buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.",
                             labels, buckets=_E2E_BUCKETS, registry=self.registry).labels(model_name)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               labels + ["finished_reason"], registry=self.registry)
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)

    def attach_engine(self, snapshot) -> None:
        self.registry.register(_EngineCollector(snapshot, self.model_name))

    def finished(self, reason: str | None) -> None:
        self.success.labels(self.model_name, reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
