"""SmolLM2-135M-Instruct on this CPU: load time of the cached model, prefill and decode tokens/s.

    python scripts/bench_smollm2.py [--threads 2] [--prompts 512,2048,4096] [--new 32] [--repeats 3]

Loads `model=smollm2-135m` from the cache (fetching it first if needed), then, in one process:
prefill tokens/s of one prompt per length through kvbench (full cache), decode tokens/s of
greedy steps after a 1,024-token prompt (kvbench's full cache and StreamingLLM at 256, and plain
transformers `generate` for reference). Medians of --repeats. Streamed perplexity (what
`task=ppl_prose` does): `scripts/bench_ppl_batch.py --model smollm2-135m --method full --batch 3`. A busy machine distorts every figure: with fewer
free cores than threads, torch's threads wait on each other at every op (pass --threads 1).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import yaml

from kvbench.engine import Budget
from kvbench.methods import build
from kvbench.models import load
from kvbench.models.generator import generate
from kvbench.resources import CONFIG_DIR


def median_seconds(repeats: int, fn, *args, **kwargs) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", default="512,2048,4096")
    parser.add_argument("--new", type=int, default=32, help="decode steps per measure")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = yaml.safe_load((CONFIG_DIR / "model" / "smollm2-135m.yaml").read_text())
    cfg = {**spec, "cache_dir": None, "dtype": "float32", "device": "cpu", "seed": 0}
    load(cfg)  # fetch/convert if needed; the timed load below reads the cache
    start = time.perf_counter()
    model, _ = load(cfg)
    print(f"threads {args.threads}; cached load {time.perf_counter() - start:.2f} s")
    full = build({"name": "full"})
    gen = torch.Generator().manual_seed(0)

    print("\n| measure | tokens/s |\n|:--|--:|")
    for n in (int(p) for p in args.prompts.split(",")):
        ids = torch.randint(100, 40_000, (1, n), generator=gen)
        s = median_seconds(args.repeats, generate, model, ids, full, None, max_new_tokens=1)
        print(f"| prefill, {n} tokens (kvbench, full cache) | {n / s:,.0f} |")

    ids = torch.randint(100, 40_000, (1, 1024), generator=gen)
    prefill = median_seconds(args.repeats, generate, model, ids, full, None, max_new_tokens=1)
    streaming = build({"name": "streamingllm", "sinks": 4, "stage": "prefill", "positions": "original"})
    for label, method, budget in (("full cache", full, None), ("StreamingLLM 256", streaming, Budget(tokens=256))):
        total = median_seconds(args.repeats, generate, model, ids, method, budget, max_new_tokens=args.new + 1)
        print(f"| decode after 1,024 tokens, batch 1 (kvbench, {label}) | {args.new / max(total - prefill, 1e-9):,.1f} |")
    mask = torch.ones_like(ids)

    plain = {"attention_mask": mask, "do_sample": False}
    hf_prefill = median_seconds(args.repeats, model.generate, ids, max_new_tokens=1, **plain)
    hf_total = median_seconds(args.repeats, model.generate, ids, max_new_tokens=args.new + 1, min_new_tokens=args.new + 1, **plain)
    print(f"| decode after 1,024 tokens, batch 1 (transformers generate) | {args.new / max(hf_total - hf_prefill, 1e-9):,.1f} |")


if __name__ == "__main__":
    main()
