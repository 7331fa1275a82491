"""KIVI-style quantized KV (kvbench.engine.quantized): bytes held per token, and a decode step's cost on the CPU.

    python scripts/bench_kivi.py                      # both shapes, 1k/4k context, float32, ~1 minute
    python scripts/bench_kivi.py --dtype bfloat16 --repeats 30
    python scripts/bench_kivi.py --device cuda --dtype float16 --lengths 1024,4096,32768

Two markdown tables, all numbers measured in this one process:

- bytes per token per layer (all KV heads, batch 1) that a `QuantizedKV` really holds after a `--context`
  token prompt (`nbytes` / tokens: codes, fp16 scales and zeros, the fp16 residual), at 2 and 4 bits, vs
  an fp16 cache; `no residual` is the limit of a long context (codes + scales only);
- one decode step of one layer: dequantize every key and value (`keys()`, `values()`) then attention of one
  query (sdpa, GQA), vs sdpa on a plain cache of the same length; median of `--repeats` after warm-up
  (the CPU by default; `--device cuda` synchronizes around each repeat).

Shapes: a 7B-like layer (Llama-2-7B: 32 query and 32 KV heads, head_dim 128) and SmolLM2-135M's
(9 query heads, 3 KV heads, head_dim 64).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kvbench.engine.quantized import QuantizedKV

SHAPES = {"7B-like (32/32 x 128)": (32, 32, 128), "SmolLM2-135M (9/3 x 64)": (9, 3, 64)}


def filled(kv_heads: int, head_dim: int, n: int, bits: int, group: int, residual: int, dtype,
           device="cpu") -> QuantizedKV:
    g = torch.Generator().manual_seed(0)
    kv = QuantizedKV(bits, group, residual)
    kv.append(torch.randn(1, kv_heads, n, head_dim, generator=g).to(device, dtype),
              torch.randn(1, kv_heads, n, head_dim, generator=g).to(device, dtype))
    return kv


def median_ms(fn, repeats: int, device: str) -> float:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bytes_table(args) -> list[str]:
    rows = ["| shape | fp16 B/token/layer | 2-bit | 2-bit vs fp16 | 4-bit | 4-bit vs fp16 | no residual: 2-bit, 4-bit |",
            "|---|---|---|---|---|---|---|"]
    for name, (_, kv_heads, head_dim) in SHAPES.items():
        fp16 = 2 * kv_heads * head_dim * 2
        cells = [name, str(fp16)]
        limits = []
        for bits in (2, 4):
            kv = filled(kv_heads, head_dim, args.context, bits, args.group, args.residual, torch.float16)
            per_token = kv.nbytes / args.context
            cells += [f"{per_token:.1f}", f"{per_token / fp16:.3f} ({fp16 / per_token:.2f}x)"]
            codes = 2 * head_dim * bits // 8  # key + value codes of one token in one head
            scales = 2 * 2 * head_dim // args.group * 2  # keys: (scale, zero) x D per G tokens; values: x D/G
            limits.append(f"{kv_heads * (codes + scales)} ({fp16 / (kv_heads * (codes + scales)):.2f}x)")
        rows.append("| " + " | ".join(cells + [", ".join(limits)]) + " |")
    return rows


def time_table(args, dtype, device) -> list[str]:
    rows = ["| shape | context | fp attention ms | 2-bit ms | 2-bit / fp | 4-bit ms | 4-bit / fp | dequant share (2-bit) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, (heads, kv_heads, head_dim) in SHAPES.items():
        for n in args.lengths:
            query = torch.randn(1, heads, 1, head_dim).to(device, dtype)
            keys, values = torch.randn(2, 1, kv_heads, n, head_dim).to(device, dtype)
            fp = median_ms(lambda k=keys, v=values, q=query: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                           args.repeats, device)
            cells = [name, str(n), f"{fp:.3f}"]
            for bits in (2, 4):
                kv = filled(kv_heads, head_dim, n, bits, args.group, args.residual, dtype, device)

                def step(kv=kv, q=query):
                    return F.scaled_dot_product_attention(q, kv.keys(), kv.values(), enable_gqa=True)

                ms = median_ms(step, args.repeats, device)
                cells += [f"{ms:.3f}", f"{ms / fp:.2f}"]
                if bits == 2:
                    share = median_ms(lambda kv=kv: (kv.keys(), kv.values()), args.repeats, device) / ms
            rows.append("| " + " | ".join(cells + [f"{share:.2f}"]) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens for the bytes table")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096])
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--residual", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"KIVI: G = {args.group}, R = {args.residual}, context {args.context}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("\n".join(bytes_table(args)))
    print(f"\nOne decode step of one layer, batch 1, {args.dtype}, {args.device}, median of {args.repeats}:\n")
    print("\n".join(time_table(args, getattr(torch, args.dtype), args.device)))


if __name__ == "__main__":
    main()
