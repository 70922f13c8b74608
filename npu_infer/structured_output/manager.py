"""StructuredOutputManager: picks the backend (--structured-outputs-config), compiles each constraint once (an
LRU cache keyed by the constraint), and makes one matcher per sequence. It lives in the engine process, beside
the scheduler, as vLLM v1's does: only the token bitmask travels to the sampling rank."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict

import numpy as np
import torch

from npu_infer.structured_output.params import BACKENDS, StructuredOutputsParams

logger = logging.getLogger(__name__)
CACHE_SIZE = 256  # compiled grammars kept (a JSON schema's is tens of KB)


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], backend: str = "auto",
                 fill_threads: int = 1):
        if backend not in BACKENDS:
            raise ValueError(f"unknown structured outputs backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.default_backend = backend
        self.fill_threads = fill_threads  # the platform's host_worker_threads(): 1 where the model runs on the CPU
        self._backends: dict = {}
        self._cache: OrderedDict = OrderedDict()
        self.last_compile_seconds = 0.0

    def _backend(self, name: str):
        if name not in self._backends:
            if name == "xgrammar":
                from npu_infer.structured_output.xgrammar_backend import XgrammarBackend
                backend = XgrammarBackend(self.tokenizer, self.vocab_size, self.stop_token_ids, self.fill_threads)
            else:
                from npu_infer.structured_output.guidance_backend import GuidanceBackend
                backend = GuidanceBackend(self.tokenizer, self.vocab_size, self.stop_token_ids)
            self._backends[name] = backend
        return self._backends[name]

    def compile(self, params: StructuredOutputsParams):
        """(backend, compiled grammar), from the cache when this constraint was seen before. Raises ValueError
        that says what is wrong with the schema, regex or grammar."""
        name = params.backend or self.default_backend
        key = (name, *params.key())
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        start = time.perf_counter()
        order = ["xgrammar", "guidance"] if name == "auto" else [name]
        errors = []
        for backend_name in order:
            backend = self._backend(backend_name)
            try:
                compiled = (backend, backend.compile(params))
                break
            except (RuntimeError, ValueError) as exc:
                errors.append(f"{backend_name}: {_first_line(exc)}")
        else:
            raise ValueError(f"invalid structured output {params.kind}: {'; '.join(errors)}")
        self.last_compile_seconds = time.perf_counter() - start
        logger.debug("compiled a %s constraint with %s in %.3f s", params.kind, compiled[0].name,
                     self.last_compile_seconds)
        self._cache[key] = compiled
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, params: StructuredOutputsParams):
        backend, compiled = self.compile(params)
        return backend.matcher(compiled)

    def fill_bitmask(self, matchers: list, bitmask: np.ndarray) -> np.ndarray:
        """Fill the rows of `bitmask` whose matcher is given (None: leave the row as it is), xgrammar's rows in one
        call."""
        from npu_infer.structured_output.xgrammar_backend import XgrammarMatcher
        tensor = torch.from_numpy(bitmask)  # shares the memory
        xgr_rows = [i for i, m in enumerate(matchers) if isinstance(m, XgrammarMatcher)]
        if xgr_rows:
            self._backend("xgrammar").fill_rows([matchers[i] for i in xgr_rows], tensor, xgr_rows)
        for i, m in enumerate(matchers):
            if m is not None and not isinstance(m, XgrammarMatcher):
                m.fill(tensor, i)
        return bitmask


def _first_line(exc: Exception) -> str:
    """xgrammar's messages start with a source location; keep what the user can act on."""
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    return first.split(": ", 1)[1] if first.startswith("[") and ": " in first else first
