"""Run the real server as a subprocess on 127.0.0.1 and a free port; read its Prometheus metrics."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
# Small, fast engine settings for tests: a 64 MiB KV cache allocates in no time.
ENGINE_FLAGS = ["--device", "cpu", "--kv-cache-memory", "64MiB", "--max-num-batched-tokens", "1024",
                "--max-num-seqs", "32"]
FAST_FLAGS = [*ENGINE_FLAGS, "--disable-log-stats"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def long_context_copy(model_dir: Path, out: Path, max_len: int = 2048) -> Path:
    """A copy of a tiny Llama whose config allows `max_len` positions (rotary has no real limit)."""
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = max_len
    (out / "config.json").write_text(json.dumps(config))
    return out


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, ready_timeout: float = 240.0):
        self.port = free_port()
        # With --ssl-certfile the server speaks HTTPS (a test's self-signed certificate: checked by the test).
        self.url = f"{'https' if '--ssl-certfile' in args else 'http'}://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "npu_infer.api.server", "--host", "127.0.0.1", "--port", str(self.port), *args]
        full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env=full_env)
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2, verify=False).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server was not ready in {timeout:.0f} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        if not self._log.closed:  # stop() closes it; the file stays readable
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the server and wait; kill it if it does not exit in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    # ---- metrics --------------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Sample name (plus labels other than model_name, as name{k=v,...}) -> value."""
        text = requests.get(self.url + "/metrics", timeout=10).text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != "model_name"}
                key = sample.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
                                     if labels else "")
                values[key] = sample.value
        return values

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Poll /metrics until no request runs or waits and no KV block is held; return the last metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
                    and m["npu_infer:kv_cache_blocks_used"] == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.1)


class SharedServer:
    """One server for a module's tests, started when a test first needs it. A test that stops the server `take`s
    it: the next test that needs one starts a fresh one, so no test has to run last, and -k or any order works."""

    def __init__(self, start: Callable[[], ServerProcess]):
        self._start = start
        self._running: ServerProcess | None = None

    def get(self) -> ServerProcess:
        if self._running is None:
            self._running = self._start()
        return self._running

    def take(self) -> ServerProcess:
        """The server, handed over to a test that stops it (the caller stops it in the end, if the test did not)."""
        server, self._running = self.get(), None
        return server

    def stop(self) -> None:
        if self._running is not None:
            self._running.stop()
            self._running = None
