"""Bytes the engine sends to its workers per step: each StepInput pickled as the multi-process executor pickles
it (the same message goes to every rank, so at tp=2 each of the two pipes carries this much).

    python benchmarks/step_bytes.py [--num-seqs 64] [--prompt-len 16] [--output-len 512]

Runs a tiny random llama in this process (the message does not depend on the model's size or the parallel
layout) and prints one JSON line per sampling setting: the bytes of the first step, of the last decode step, and
the mean over all steps. Deterministic: no timing involved.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from npu_infer import LLM, SamplingParams  # noqa: E402

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "penalties": dict(temperature=0.8, top_p=0.9, seed=0, repetition_penalty=1.1, frequency_penalty=0.1),
}


def tiny_model(out: Path, max_len: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def measure(llm: LLM, params: SamplingParams, num_seqs: int, prompt_len: int) -> dict:
    sizes: list[int] = []
    executor = llm.engine.executor
    execute = executor.execute

    def counting_execute(step):
        sizes.append(len(pickle.dumps(("execute", step), protocol=pickle.HIGHEST_PROTOCOL)))
        return execute(step)

    executor.execute = counting_execute
    try:
        prompts = [[(7 * i + j) % 250 + 1 for j in range(prompt_len)] for i in range(num_seqs)]
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        executor.execute = execute
    return {"steps": len(sizes), "first_step_bytes": sizes[0], "last_step_bytes": sizes[-1],
            "mean_step_bytes": round(sum(sizes) / len(sizes))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=512)
    args = parser.parse_args()
    max_len = args.prompt_len + args.output_len + 16
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(tiny_model(Path(tmp), max_len), device="cpu", dtype="float32", max_model_len=max_len,
                  max_num_seqs=args.num_seqs, max_num_batched_tokens=max(args.num_seqs * args.prompt_len, 256),
                  kv_cache_memory="64MiB", skip_tokenizer_init=True)
        try:
            for name, setting in SETTINGS.items():
                params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, **setting)
                result = measure(llm, params, args.num_seqs, args.prompt_len)
                print(json.dumps({"setting": name, "num_seqs": args.num_seqs, "output_len": args.output_len,
                                  **result}), flush=True)
        finally:
            llm.engine.shutdown()


if __name__ == "__main__":
    main()
