"""The OpenAI-compatible server: `python -m npu_infer.api.server` (see server.py and docs/server.md)."""
