"""Rendering a request's own chat template: in a child process, with a time limit, an output limit and a memory
limit, through jinja2's sandbox.

Why a process: a template is a program (`{% for i in range(10**6) %}{% for j in range(10**6) %}`), and a thread
running it cannot be stopped; the child is killed when its time is up and a fresh one is started. The child is
this file run as a script, so it imports jinja2 and the standard library only (not torch, not the server).
It speaks JSON lines on stdin/stdout: {"template", "variables", "max_chars"} -> {"text"} or {"error"}."""
from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading

logger = logging.getLogger(__name__)
_CHILD_MEMORY_BYTES = 2 * 2**30  # address space; a template that builds huge lists fails with MemoryError


class TemplateError(ValueError):
    """The template failed, ran too long or rendered too much: the request's fault (a 400)."""


class TemplateSandbox:
    def __init__(self, timeout: float, max_chars: int):
        self.timeout, self.max_chars = timeout, max_chars
        self._lock = threading.Lock()
        self._child: subprocess.Popen | None = None

    def render(self, template: str, variables: dict) -> str:
        """Blocking (run it on a worker thread): the rendered text, or TemplateError."""
        if not self._lock.acquire(timeout=self.timeout):
            raise TemplateError(f"the chat template could not be rendered within {self.timeout:g} s "
                                "(other request templates are rendering); retry")
        try:
            child = self._child if self._child is not None and self._child.poll() is None else self._start()
            line = json.dumps({"template": template, "variables": variables, "max_chars": self.max_chars})
            try:
                child.stdin.write(line + "\n")
                child.stdin.flush()
            except OSError:
                self._kill()
                raise TemplateError("the chat template renderer failed; retry") from None
            ready, _, _ = select.select([child.stdout], [], [], self.timeout)
            if not ready:
                self._kill()
                raise TemplateError(f"the chat template took longer than {self.timeout:g} s to render "
                                    "(--chat-template-timeout)")
            answer = child.stdout.readline()
            if not answer:
                self._kill()
                raise TemplateError("the chat template renderer stopped (the template used too much memory?)")
            result = json.loads(answer)
            if "error" in result:
                raise TemplateError(f"the chat template failed: {result['error']}")
            return result["text"]
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _start(self) -> subprocess.Popen:
        self._child = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, encoding="utf-8", bufsize=1)
        return self._child

    def _kill(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            self._child = None


# ---- the child --------------------------------------------------------------------------------------------------
def _environment():
    """transformers' chat-template environment: the sandbox, trim/lstrip blocks, loop controls, raise_exception,
    tojson keeping non-ASCII text, strftime_now."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError as JinjaTemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise JinjaTemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _render(env, request: dict) -> dict:
    try:
        parts, size = [], 0
        for part in env.from_string(request["template"]).generate(**request["variables"]):
            size += len(part)
            if size > request["max_chars"]:
                return {"error": f"it rendered more than {request['max_chars']} characters (--chat-template-max-chars)"}
            parts.append(part)
        return {"text": "".join(parts)}
    except MemoryError:
        return {"error": "it used too much memory"}
    except Exception as exc:  # noqa: BLE001 -- any template error is reported to the request
        return {"error": f"{type(exc).__name__}: {exc}"}


def _serve() -> None:
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (_CHILD_MEMORY_BYTES, _CHILD_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    env = _environment()
    for line in sys.stdin:
        sys.stdout.write(json.dumps(_render(env, json.loads(line))) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
