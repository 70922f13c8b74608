"""The server's bounds: their flags, and the ASGI middleware that admits requests — 413 past the body limit,
429 (with Retry-After) past --max-concurrent-requests, 503 while shutting down — before FastAPI parses a byte."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass

from npu_infer.api.errors import error_body

# Paths that start engine work; only these count against --max-concurrent-requests.
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


@dataclass
class ServerLimits:
    max_concurrent_requests: int = 256
    max_request_body_bytes: int = 16 * 2**20
    max_sequences_per_request: int = 256
    trust_request_chat_template: bool = False
    chat_template_timeout: float = 5.0
    chat_template_max_chars: int = 2**20
    shutdown_timeout: float = 30.0


def add_limit_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The limits group (--step-timeout, an engine flag, joins it from engine_args.py)."""
    d = ServerLimits()
    g = parser.add_argument_group("limits and hardening (see docs/server.md, Security and limits)")
    g.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                   help="generation requests in flight (running, waiting or streaming); more get 429 with Retry-After")
    g.add_argument("--max-request-body-bytes", type=int, default=d.max_request_body_bytes,
                   help="largest request body; larger ones get 413")
    g.add_argument("--max-sequences-per-request", type=int, default=d.max_sequences_per_request,
                   help="sequences one request may start (prompts x max(n, best_of)); more is a 400")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a `chat_template` in chat requests (rendered in a sandboxed child process with "
                        "a time and size limit); refused with a 400 otherwise")
    g.add_argument("--chat-template-timeout", type=float, default=d.chat_template_timeout,
                   help="seconds a request's own chat template may take to render")
    g.add_argument("--chat-template-max-chars", type=int, default=d.chat_template_max_chars,
                   help="longest text a request's own chat template may render")
    g.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="on SIGTERM/SIGINT, seconds in-flight requests may take to finish before they are aborted; "
                        "a second signal exits at once")
    return g


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    limits = ServerLimits(**{name: getattr(args, name) for name in ServerLimits.__dataclass_fields__})
    for name in ("max_concurrent_requests", "max_request_body_bytes", "max_sequences_per_request",
                 "chat_template_max_chars"):
        if getattr(limits, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    return limits


class AdmissionMiddleware:
    """Reads the body itself (refusing it once it passes the limit, never buffering more), counts generation
    requests in flight until their response — streams included — has been sent."""

    def __init__(self, app, limits: ServerLimits, closing: Callable[[], bool]):
        self.app, self.limits, self.closing = app, limits, closing
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        generation = scope["path"] in GENERATION_PATHS
        if generation and self.closing():
            return await _refuse(send, 503, "the server is shutting down; retry on another replica")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(receive)
            if body is None:
                limit = self.limits.max_request_body_bytes
                return await _refuse(send, 413, f"the request body is larger than the server's limit of {limit} "
                                                "bytes (--max-request-body-bytes)")
            receive = _replay(body, receive)
        if not generation:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limits.max_concurrent_requests:
            return await _refuse(send, 429, f"the server has {self.in_flight} requests in flight, its limit "
                                            "(--max-concurrent-requests); retry later", {"retry-after": "1"})
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None past the limit."""
        limit = self.limits.max_request_body_bytes
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see an empty body
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _drain(receive, message, 4 * limit)  # so the client reads the 413 instead of a reset
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _drain(receive, message: dict, budget: int) -> None:
    """Read and drop the rest of a refused body, up to `budget` bytes."""
    while message.get("more_body", False) and budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: only the disconnect, as before

    return replayed


async def _refuse(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(error_body(status, message)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close")]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})
