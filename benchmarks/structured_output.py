"""Structured-output overhead: 16 requests decoding at once under a JSON schema against the same 16 unconstrained,
output tokens/s of both in one run, and the time to compile a typical schema (first, then from the cache).

    python benchmarks/structured_output.py                     # SmolLM2 (the packaged GGUF), CPU backend
    python benchmarks/structured_output.py --model DIR --device npu --concurrency 64 --output-len 256

Both runs produce exactly --output-len tokens per request: the unconstrained one ignores EOS, and the schema (an
array of at least 200 objects) cannot finish earlier, so the ratio compares equal work; the constrained run pays
for the per-step bitmask (xgrammar, filled on the host for all rows in one call), its transfer and the masking
on the device.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ITEM = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                         "email": {"type": "string", "format": "email"},
                                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                  "maxItems": 3}},
        "required": ["name", "age", "email", "tags"]}
LONG_SCHEMA = {"type": "array", "items": ITEM, "minItems": 200}


def main() -> None:
    from npu_infer import LLM, SamplingParams
    from npu_infer.api.args import default_model_path
    from npu_infer.structured_output import StructuredOutputsParams

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the packaged SmolLM2-135M-Instruct GGUF")
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--backend", default="xgrammar", choices=["xgrammar", "guidance"])
    p.add_argument("--repeat", type=int, default=3, help="rounds of (unconstrained, schema)")
    args = p.parse_args()

    llm = LLM(args.model or default_model_path(), device=args.device, max_model_len=1024, kv_cache_memory="256MiB",
              structured_outputs_backend=args.backend)
    manager = llm.engine.structured_outputs
    start = time.perf_counter()
    manager.compile(StructuredOutputsParams(choice=["a"]))  # the backend's one-off set-up (the tokenizer's vocab)
    print(f"backend set-up ({args.backend}): {(time.perf_counter() - start) * 1000:.0f} ms")
    typical = StructuredOutputsParams(json=ITEM)
    start = time.perf_counter()
    manager.compile(typical)
    first = time.perf_counter() - start
    start = time.perf_counter()
    manager.compile(StructuredOutputsParams(json=json.loads(json.dumps(ITEM))))  # equal schema, new object
    cached = time.perf_counter() - start
    print(f"compile a typical schema ({args.backend}): first {first * 1000:.1f} ms, cached {cached * 1000:.3f} ms")

    prompts = [f"List {200 + i} people as JSON:" for i in range(args.concurrency)]
    plain = SamplingParams(temperature=0.8, seed=0, max_tokens=args.output_len, ignore_eos=True)
    schema = SamplingParams(temperature=0.8, seed=0, max_tokens=args.output_len,
                            structured_outputs=StructuredOutputsParams(json=LONG_SCHEMA))
    llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    start = time.perf_counter()
    manager.compile(schema.structured_outputs)  # compiled once, as a server's cache holds it; not in round 1's time
    print(f"compile the benchmark's schema ({args.backend}): {(time.perf_counter() - start) * 1000:.0f} ms")
    rates: dict[str, list[float]] = {"unconstrained": [], "json schema": []}
    for _ in range(args.repeat):  # interleaved, so a drift of the shared machine's speed hits both alike
        for name, params in (("unconstrained", plain), ("json schema", schema)):
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rates[name].append(tokens / seconds)
            print(f"{name:14s}: {args.concurrency} requests x {tokens // args.concurrency} tokens in {seconds:.2f} s = "
                  f"{rates[name][-1]:.1f} output tok/s")
    ratios = [s / u for s, u in zip(rates["json schema"], rates["unconstrained"])]
    print("ratio json schema / unconstrained, each round: " + ", ".join(f"{r:.3f}" for r in ratios))
    print(f"ratio json schema / unconstrained, median of the rounds: {statistics.median(ratios):.3f} "
          "(target >= 0.9)")

if __name__ == "__main__":
    main()
