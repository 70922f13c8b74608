"""One SmolLM2-135M decoder layer's linears (qkv, o, gate_up, down) at several batch sizes, bf16 against W8A8 and
W8A16, each path timed interleaved with the others in one run (the machine may be shared: read the ratios).

Paths: bf16 = our packed AVX-512 kernel up to 256 rows, oneDNN above (CpuPackedLinear); w8a8 / w8a16 kernel =
cpu_int8_kernels.cpp forced; w8a8 onednn = per-token quantization + torch._int_mm (oneDNN's int8 GEMM) + scales;
w8a16 onednn = the weight made bf16 per call + oneDNN's bf16 GEMM; w8a16 gG kernel = the W8A16 kernel with one scale
per G input channels (`--group-size`, several allowed).

    python benchmarks/int8_kernels.py [--rows 1 16 64 256 1024] [--repeats 5] [--threads 1] [--group-size 64]
"""
from __future__ import annotations

import argparse
import time

import torch

from npu_infer.models.layers.int8_linear import quantize_weight
from npu_infer.platform import cpu_kernels, cpu_linear
from npu_infer.platform.cpu_linear import CpuInt8Linear, CpuPackedLinear

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # (N, K)


def layer_paths(kernels, group_sizes: list[int]):
    g = torch.Generator().manual_seed(0)
    paths = {"bf16": [], "w8a8 kernel": [], "w8a8 onednn": [], "w8a16 kernel": [], "w8a16 onednn": []}
    paths.update({f"w8a16 g{group} kernel": [] for group in group_sizes})
    for n, k in SHAPES.values():
        w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
        wq, scale = quantize_weight(w)
        paths["bf16"].append((k, CpuPackedLinear(w, kernels)))
        for scheme in ("w8a8", "w8a16"):
            lin = CpuInt8Linear(wq, scale, scheme, kernels, torch.bfloat16)
            paths[f"{scheme} kernel"].append((k, lin))
            paths[f"{scheme} onednn"].append((k, lin))
        for group in group_sizes:  # per channel where G does not divide K, as quantize-on-load does
            paths[f"w8a16 g{group} kernel"].append(
                (k, CpuInt8Linear(*quantize_weight(w, group if k % group == 0 else None), "w8a16", kernels,
                                  torch.bfloat16)))
    return paths


def run(name, linears, x_by_k):
    """One pass of the layer's linears; the onednn variants force the library path by the row limits."""
    big = 1 << 30
    cpu_linear.W8A8_KERNEL_MAX_ROWS = big if "w8a8 kernel" == name else 0
    cpu_linear.W8A16_KERNEL_MAX_ROWS = big if name.startswith("w8a16") and name.endswith("kernel") else 0
    for k, lin in linears:
        lin(x_by_k[k], None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (1 is steadier on a loaded machine)")
    parser.add_argument("--group-size", type=int, nargs="*", default=[], help="also time W8A16 with group scales")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = cpu_kernels.load()
    if kernels is None:
        raise SystemExit("the CPU kernels are unavailable here")
    paths = layer_paths(kernels, args.group_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per layer (4 linears), best of "
          f"{args.repeats} interleaved rounds")
    print(f"{'rows':>6} " + " ".join(f"{name:>13}" for name in paths) + "   w8a8/bf16 w8a16/bf16")
    for rows in args.rows:
        x_by_k = {k: torch.randn(rows, k).bfloat16() for _, k in SHAPES.values()}
        best = {name: float("inf") for name in paths}
        iters = max(1, 256 // rows)
        for _ in range(args.repeats):
            for name, linears in paths.items():
                run(name, linears, x_by_k)  # warm
                t0 = time.perf_counter()
                for _ in range(iters):
                    run(name, linears, x_by_k)
                best[name] = min(best[name], (time.perf_counter() - t0) / iters * 1e3)
        w8a8 = min(best["w8a8 kernel"], best["w8a8 onednn"])
        w8a16 = min(best["w8a16 kernel"], best["w8a16 onednn"])
        print(f"{rows:>6} " + " ".join(f"{best[name]:>13.3f}" for name in paths)
              + f"   {best['bf16'] / w8a8:>8.2f}x {best['bf16'] / w8a16:>9.2f}x")


if __name__ == "__main__":
    main()
