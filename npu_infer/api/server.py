"""The OpenAI-compatible HTTP server: `python -m npu_infer.api.server` / `npu-infer serve`, vLLM's flags.

The engine is built (weights loaded, KV cache sized) before the port opens, so the server is ready when it
answers. SIGINT / SIGTERM stop accepting connections, abort what is in flight, and exit 0."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from npu_infer import __version__
from npu_infer.api.args import (api_keys, engine_config_from_args, log_requests, parse_serve_args,
                               served_model_names)
from npu_infer.api.async_engine import AsyncEngine
from npu_infer.api.chat import create_chat_completion, render_chat
from npu_infer.api.completions import create_completion
from npu_infer.api.errors import APIError, install_error_handlers
from npu_infer.api.metrics import CONTENT_TYPE, ServerMetrics
from npu_infer.api.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
                                    ModelCard, ModelList, TokenizeRequest, TokenizeResponse)
from npu_infer.api.serving import ServingContext
from npu_infer.optional_deps import MissingDependencyError
from npu_infer.platform.interface import DeviceUnavailableError

logger = logging.getLogger("npu_infer.api.server")


def build_app(engine: AsyncEngine, model_names: list[str], metrics: ServerMetrics, api_keys: list[str] | None = None,
              log_requests: bool = True, log_stats_interval: float | None = 10.0, max_log_len: int | None = None,
              prompt_tokens_details: bool = False, cors: dict | None = None, root_path: str = "",
              enable_auto_tool_choice: bool = False, tool_call_parser: str | None = None) -> FastAPI:
    """The FastAPI app around a started-or-not AsyncEngine; the app's lifespan starts and stops it. `cors` holds
    Starlette CORSMiddleware's arguments (default: every origin, method and header, as vLLM's defaults)."""
    if enable_auto_tool_choice and tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)")
    ctx = ServingContext(engine, model_names, log_requests, max_log_len, prompt_tokens_details,
                         enable_auto_tool_choice, tool_call_parser, engine.engine.config.reasoning_parser)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        stats = asyncio.ensure_future(_log_stats(engine, log_stats_interval)) if log_stats_interval else None
        try:
            yield
        finally:
            if stats is not None:
                stats.cancel()
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="npu_infer", version=__version__, lifespan=lifespan, root_path=root_path)
    app.add_middleware(CORSMiddleware, **(cors or {"allow_origins": ["*"], "allow_methods": ["*"],
                                                   "allow_headers": ["*"]}))
    install_error_handlers(app)
    app.state.ctx = ctx

    keys = [key.encode() for key in api_keys or []]

    async def check_api_key(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Every key is compared (no early exit), so the time taken does not tell which key came close.
        matches = [secrets.compare_digest(token.strip().encode(), key) for key in keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise APIError(401, "missing or wrong API key; send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    auth = [Depends(check_api_key)]

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            return JSONResponse({"error": {"message": "the engine is not running", "type": "service_unavailable",
                                           "param": None, "code": 503}}, status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        config = ctx.llm.config
        return ModelList(data=[ModelCard(id=name, root=config.model, max_model_len=config.max_model_len)
                               for name in model_names]).model_dump()

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(body, raw, ctx)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(body, raw, ctx)

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest) -> dict:
        ctx.model_name(body.model)
        if body.messages is not None:
            ids = render_chat(ctx, body.messages, body.add_generation_prompt)
        else:
            ids = ctx.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        strs = ctx.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=ctx.max_model_len, tokens=ids,
                                token_strs=strs).model_dump()

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest) -> dict:
        ctx.model_name(body.model)
        tokenizer = ctx.need_tokenizer("detokenize")
        vocab = ctx.llm.vocab_size
        if any(t < 0 or t >= max(vocab, len(tokenizer)) for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {max(vocab, len(tokenizer))})", param="tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens)).model_dump()

    return app


async def _log_stats(engine: AsyncEngine, interval: float) -> None:
    """One line every `interval` seconds while there is work: throughput, queue, KV usage, prefix hit rate."""
    last = engine.snapshot()
    while True:
        await asyncio.sleep(interval)
        now = engine.snapshot()
        dt = max(now["time"] - last["time"], 1e-9)
        prompt = now["prompt_tokens"] - last["prompt_tokens"]
        gen = now["generation_tokens"] - last["generation_tokens"]
        if prompt or gen or now["running"] or now["waiting"]:
            queries = now["prefix_queries"] - last["prefix_queries"]
            hits = now["prefix_hits"] - last["prefix_hits"]
            logger.info("engine: prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, KV cache %.1f%%, "
                        "prefix cache hit rate %.1f%%, preemptions %d", prompt / dt, gen / dt, now["running"],
                        now["waiting"], 100 * now["kv_usage"], 100 * hits / queries if queries else 0.0,
                        now["preemptions"])
        last = now


class _Server(uvicorn.Server):
    """uvicorn, but a signal aborts the requests in flight at once, and the process exits 0 afterwards."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            self.on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
        # uvicorn re-raises the captured signal here; we exit normally instead.


def _format_bytes(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1024**3:.2f} GiB"


def _log_startup(engine, url: str, started: float) -> None:
    m = engine.memory or {}
    config = engine.config
    block_bytes = m.get("kv_bytes", 0) / max(m.get("num_blocks", 1), 1)
    capacity = m.get("num_blocks", 0) * config.block_size
    print(f"KV budget: total {_format_bytes(m.get('total'))}, budget {_format_bytes(m.get('budget'))}, weights "
          f"{_format_bytes(m.get('weights'))}, activation peak {_format_bytes(m.get('activation_peak'))}, "
          f"KV cache {_format_bytes(m.get('kv_bytes'))} = {m.get('num_blocks')} blocks x {config.block_size} tokens "
          f"({block_bytes / 1024:.1f} KiB each), {capacity / config.max_model_len:.1f} sequences of max_model_len "
          f"{config.max_model_len}", flush=True)
    print(f"npu_infer {__version__} serving {config.model} on {engine.platform.device_type} "
          f"(dtype {str(config.torch_dtype).removeprefix('torch.')}) at {url} "
          f"(engine ready in {time.monotonic() - started:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_serve_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    started = time.monotonic()
    # A signal during the (seconds-long) model load ends start-up cleanly instead of with a traceback.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        config = engine_config_from_args(args)
        from npu_infer.engine.llm_engine import LLMEngine
        metrics = ServerMetrics(served_model_names(args, config)[0])
        engine = AsyncEngine.build(lambda: LLMEngine(config), metrics)  # built on the thread that steps it
        llm_engine = engine.engine
    except (ValueError, FileNotFoundError, DeviceUnavailableError, MissingDependencyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted during start-up", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    names = served_model_names(args, config)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        print("error: --enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)", file=sys.stderr)
        engine.shutdown(timeout=5)
        return 2
    app = build_app(engine, names, metrics, api_keys=api_keys(args), log_requests=log_requests(args),
                    log_stats_interval=None if args.disable_log_stats else args.log_stats_interval,
                    max_log_len=args.max_log_len, prompt_tokens_details=args.enable_prompt_tokens_details,
                    cors={"allow_origins": args.allowed_origins, "allow_methods": args.allowed_methods,
                          "allow_headers": args.allowed_headers, "allow_credentials": args.allow_credentials},
                    root_path=args.root_path or "",
                    enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser)
    host = args.host if args.host is not None else "0.0.0.0"
    scheme = "https" if args.ssl_certfile else "http"
    url = f"{scheme}://{'localhost' if host in ('0.0.0.0', '::') else host}:{args.port}{args.root_path or ''}"
    _log_startup(llm_engine, url, started)
    uv_config = uvicorn.Config(app, host=host, port=args.port, log_level=args.uvicorn_log_level,
                               access_log=not args.disable_uvicorn_access_log, timeout_keep_alive=5,
                               ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                               ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
                               **({"ssl_ciphers": args.ssl_ciphers} if args.ssl_ciphers else {}))
    server = _Server(uv_config, on_exit=engine.abort_all)
    threading.Thread(target=_stop_when_engine_dies, args=(engine, server), daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        if exc.code:
            print(f"error: could not serve on {host}:{args.port} (is the port in use?)", file=sys.stderr)
            engine.shutdown(timeout=5)
            return 1
    return 1 if engine.died.is_set() else 0


def _stop_when_engine_dies(engine: AsyncEngine, server: _Server) -> None:
    """A dead engine (e.g. a worker process was killed) cannot serve again: say why, stop, exit non-zero."""
    engine.died.wait()
    print(f"error: the engine stopped, shutting the server down: {engine._dead}".splitlines()[0], file=sys.stderr,
          flush=True)
    server.should_exit = True


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
