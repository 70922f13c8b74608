"""llama.cpp's batch-1 decode on a GGUF file, for comparison with ours on the same file (run it from a venv with
llama-cpp-python; it does not import npu_infer).

    /path/to/llama-venv/bin/python benchmarks/llamacpp_decode.py FILE.gguf [--rounds 3] [--threads 2]
    python benchmarks/offline_throughput.py --model FILE.gguf --dtypes bfloat16 --quantization gguf --num-prompts 8 \
        --skip-transformers                                               # ours, batch-1 TPOT, run in turn

Each round: 128 random prompt tokens (ids 100..48999, seeded), then 128 greedy tokens through `Llama.generate`;
prints the prompt's tok/s and the TPOT after the first token. The TPOT holds llama-cpp-python's per-token Python loop
as ours holds our engine's."""
from __future__ import annotations

import argparse
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    from llama_cpp import Llama
    llm = Llama(model_path=args.model, n_ctx=1024, n_threads=args.threads, n_batch=512, verbose=False)
    rng = random.Random(0)
    for r in range(args.rounds):
        prompt = [rng.randrange(100, 49000) for _ in range(args.input_len)]
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill_s = time.perf_counter() - start
        count, first = 0, 0.0
        for _ in llm.generate(prompt, temp=0.0, reset=False):
            count += 1
            if count == 1:
                first = time.perf_counter()
            if count > args.output_len:
                break
        tpot_ms = (time.perf_counter() - first) / (count - 1) * 1e3
        print(f"round {r + 1}: prefill {args.input_len / prefill_s:.0f} tok/s; TPOT {tpot_ms:.2f} ms over "
              f"{count - 1} tokens", flush=True)


if __name__ == "__main__":
    main()
