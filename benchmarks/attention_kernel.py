"""The CPU paged_attention kernel against torch SDPA, and the decode case with and without huge pages.

    python benchmarks/attention_kernel.py [--batch 64] [--context 192] [--layers 30] [--repeats 10]

Decode: `--batch` sequences of `--context` cached tokens each, SmolLM2's heads (9 query, 3 KV, head_dim 64, bf16),
one cache per layer as the engine has (their blocks do not fit in L3), block tables shuffled (as a long-running
server's are) or in order; each cache 4 KB-paged or madvise'd to huge pages before it is zeroed (what the CPU
platform does). Prefill: 16 fresh prompts of 128 tokens (a 2048-token step) against the batched causal SDPA call
the torch path makes. Prints ms per step (all layers), median of `--repeats`."""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from npu_infer.platform import cpu_kernels
from npu_infer.platform.huge_pages import advise_huge_pages

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def make_caches(layers: int, blocks: int, block: int, huge: bool) -> list[torch.Tensor]:
    caches = []
    for _ in range(layers):
        cache = torch.empty(2, KV_HEADS, blocks, block, HEAD_DIM, dtype=torch.bfloat16)
        if huge:
            advise_huge_pages(cache)
        caches.append(cache.normal_())
    return caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=192)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    kernels = cpu_kernels.load()
    if kernels is None:
        raise SystemExit("the CPU kernels did not build here (they need AVX-512 BF16)")
    torch.manual_seed(0)
    per_seq = -(-args.context // args.block_size)
    blocks = args.batch * per_seq * 2
    shuffled = torch.randperm(blocks)[:args.batch * per_seq].view(args.batch, per_seq).int().contiguous()
    in_order = torch.arange(args.batch * per_seq).view(args.batch, per_seq).int().contiguous()
    lens = torch.full((args.batch,), args.context, dtype=torch.int32)
    q = torch.randn(args.batch, HEADS, HEAD_DIM).bfloat16()
    kv_bytes = args.batch * args.context * args.layers * 2 * KV_HEADS * HEAD_DIM * 2
    print(f"decode: {args.batch} sequences x {args.context} tokens, {args.layers} layers ({kv_bytes / 1e6:.0f} MB of "
          f"K/V a step), ms per step")
    # Both cache sets at once, measured in turn round after round: the machine's drift hits all four alike.
    sets = {huge: make_caches(args.layers, blocks, args.block_size, huge) for huge in (False, True)}
    cases = [(huge, name, tables) for huge in (False, True)
             for name, tables in (("shuffled blocks", shuffled), ("blocks in order", in_order))]
    times: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    for _ in range(args.repeats):
        for i, (huge, _, tables) in enumerate(cases):
            times[i].append(median_ms(lambda: [kernels.decode_attention(q, c, tables, lens, 0.125) for c in sets[huge]], 1, warmup=1))
    for i, (huge, name, _) in enumerate(cases):
        ms = sorted(times[i])[len(times[i]) // 2]
        print(f"  {'huge pages' if huge else '4 KB pages'}, {name:15s} {ms:7.2f} ms  ({kv_bytes / ms / 1e6:5.1f} GB/s)")
    for j, name in enumerate(("shuffled blocks", "blocks in order")):
        ratios = sorted(a / b for a, b in zip(times[j], times[j + 2]))
        print(f"  4 KB / huge pages, {name}: median {ratios[len(ratios) // 2]:.2f}x over {len(ratios)} rounds "
              f"({ratios[0]:.2f}-{ratios[-1]:.2f})")
    # The ceiling: the same bytes read front to back by torch (a sum), in turn with the kernel, huge pages in order.
    used = args.batch * per_seq
    plain = [c[:, :, :used].view(torch.float32) for c in sets[True]]
    kernel_ms, read_ms = [], []
    for _ in range(args.repeats):
        kernel_ms.append(median_ms(lambda: [kernels.decode_attention(q, c, in_order, lens, 0.125) for c in sets[True]], 1, warmup=1))
        read_ms.append(median_ms(lambda: [t.sum() for t in plain], 1, warmup=1))
    fractions = sorted(r / k for k, r in zip(kernel_ms, read_ms))
    read = sorted(read_ms)[len(read_ms) // 2]
    print(f"  a plain read of the same K/V (torch sum): {read:.2f} ms ({kv_bytes / read / 1e6:.1f} GB/s); the kernel "
          f"(huge pages, in order) reads at {fractions[len(fractions) // 2]:.2f}x of that rate, median "
          f"({fractions[0]:.2f}-{fractions[-1]:.2f})")
    del sets

    prompts, length = 16, 128
    tokens = prompts * length
    per_prompt = -(-length // args.block_size)
    cache = make_caches(1, prompts * per_prompt, args.block_size, True)[0]
    tables = torch.arange(prompts * per_prompt).view(prompts, per_prompt).int().contiguous()
    starts = torch.arange(0, tokens + 1, length, dtype=torch.int32)
    seq_lens = torch.full((prompts,), length, dtype=torch.int32)
    qp = torch.randn(tokens, HEADS, HEAD_DIM).bfloat16()
    k = cache[0].permute(1, 2, 0, 3).reshape(tokens, KV_HEADS, HEAD_DIM)  # the same K/V the kernel reads
    v = cache[1].permute(1, 2, 0, 3).reshape(tokens, KV_HEADS, HEAD_DIM)

    def sdpa():
        qb, kb, vb = (t.view(prompts, length, -1, HEAD_DIM).transpose(1, 2) for t in (qp, k, v))
        return F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=0.125, enable_gqa=True)

    ours = median_ms(lambda: kernels.paged_attention(qp, cache, tables, starts, seq_lens, 0.125), args.repeats)
    theirs = median_ms(sdpa, args.repeats)
    print(f"prefill: {prompts} prompts x {length} tokens, one layer: paged_attention {ours:.2f} ms, torch SDPA "
          f"(batched, causal) {theirs:.2f} ms ({theirs / ours:.2f}x)")


if __name__ == "__main__":
    main()
