"""Peak memory and time of prefill + compress per method, and decode-step time at a fixed budget.

    python scripts/bench_compression.py                                  # CPU defaults: 1k..16k tokens
    python scripts/bench_compression.py --lengths 1024,4096 --methods full,h2o,vatp
    python scripts/bench_compression.py --device cuda --dtype bfloat16 --hidden 4096 --layers 32 \\
        --heads 32 --kv-heads 32 --intermediate 11008 --lengths 4096,8192,16384,32768   # 7B shape, random weights

Prefill: for each context length and method, a fresh process builds a random
Llama of the given shape, prefills the prompt through kvbench's cache (each
layer compacted to `--budget` right after its attention) and reports its peak
memory: CUDA max allocated, or on the CPU the process's peak RSS (and the
increment over the RSS after the model is built). The baseline `sdpa-full`
is a plain transformers prefill with sdpa and its own DynamicCache.

Decode: a prompt of 2C tokens is compressed to C with `stage: decode`, then
`--decode-steps` steps are timed (each evicts one token). Two baselines hold
C tokens without compression: plain transformers (sdpa, DynamicCache, which
copies the whole cache every step) and kvbench's own cache with `full` (the
policy's overhead alone). Medians of per-step times, in one process.

Prints both tables and writes them as CSV under `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = {
    "sdpa-full": None,  # plain transformers, no kvbench
    "full": {"name": "full"},
    "streamingllm": {"name": "streamingllm"},
    "h2o": {"name": "h2o", "stage": "prefill"},
    "vatp": {"name": "vatp", "stage": "prefill"},
    "snapkv": {"name": "snapkv"},
    "tova": {"name": "tova", "stage": "prefill"},
}


def build_model(args):
    from kvbench.attention import install
    from kvbench.models import build_tiny

    shape = {
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": max(args.max_length * 2 + 64, 4096),
    }
    model, _ = build_tiny(shape, seed=0)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    install(model, "sdpa")
    return model


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.inference_mode()
def prefill(model, method_cfg, ids, budget):
    from transformers import DynamicCache

    from kvbench.cache import Budget, CompressedCache
    from kvbench.generation import forward
    from kvbench.methods import build

    if method_cfg is None:
        model.set_attn_implementation("sdpa")
        out = model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
        return out.logits
    cache = CompressedCache(model, build(method_cfg), Budget(tokens=budget))
    return forward(model, cache, ids)


def child(args) -> None:
    """One prefill measurement in this (fresh) process; prints one JSON line."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args)
    ids = torch.randint(4, 260, (1, args.length), device=device)
    prefill(model, METHODS[args.method], ids[:, :64], args.budget)  # warm up kernels at a small size
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    start = time.perf_counter()
    logits = prefill(model, METHODS[args.method], ids, args.budget)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_bytes(device)
    print(json.dumps({
        "method": args.method, "length": args.length, "seconds": round(seconds, 3), "peak_bytes": peak,
        "increment_bytes": peak - base, "finite": bool(torch.isfinite(logits).all()),
    }))


def run_child(args, method: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--method", method, "--length", str(length)]
    for key in ("budget", "hidden", "intermediate", "layers", "heads", "kv_heads", "dtype", "device", "max_length"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmark child failed ({method}, {length}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@torch.inference_mode()
def decode_step_times(model, method_cfg, budget: int, steps: int, device) -> list[float]:
    from transformers import DynamicCache

    from kvbench.cache import Budget, CompressedCache
    from kvbench.generation import forward
    from kvbench.methods import build

    torch.manual_seed(1)
    if method_cfg is None:  # plain sdpa over a full cache of `budget` tokens
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
        ids = torch.randint(4, 260, (1, budget), device=device)
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

        def step(token):
            return model(input_ids=token, past_key_values=cache, use_cache=True).logits
    else:
        from kvbench.attention import install

        install(model, "sdpa")
        method = build(method_cfg if method_cfg["name"] in ("full", "snapkv") else {**method_cfg, "stage": "decode"})
        cache = CompressedCache(model, method, Budget(tokens=budget), reserve=steps + 8)
        prompt = budget if method_cfg["name"] == "full" else 2 * budget  # full: a cache of exactly C tokens
        ids = torch.randint(4, 260, (1, prompt), device=device)
        logits = forward(model, cache, ids)
        cache.phase = "decode"

        def step(token):
            return forward(model, cache, token)
    times = []
    for i in range(steps + 3):
        token = logits[:, -1].argmax(-1)[:, None]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = step(token)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # warm-up steps are not counted
            times.append(time.perf_counter() - start)
    return times


def add_model_arguments(parser) -> None:
    """The random model's shape, dtype and device, and the output folder (shared with bench_ragged.py)."""
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/bench")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--methods", default="sdpa-full,full,streamingllm,h2o,vatp,snapkv,tova")
    parser.add_argument("--budget", type=int, default=512, help="tokens kept per head after the prompt")
    parser.add_argument("--decode-budgets", default="1024,4096", help="cache sizes C for the decode-step timing")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--decode-methods", default="streamingllm,h2o,vatp,tova")
    add_model_arguments(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    decode_budgets = [int(x) for x in args.decode_budgets.split(",") if x]
    args.max_length = args.max_length or max(lengths + [2 * b for b in decode_budgets])
    if args.child:
        child(args)
        return

    import pandas as pd
    from tqdm import tqdm

    methods = args.methods.split(",")
    rows = []
    for length, method in tqdm([(n, m) for n in lengths for m in methods], desc="prefill", unit="run"):
        rows.append(run_child(args, method, length))
    prefill_table = pd.DataFrame(rows, columns=["method", "length", "seconds", "peak_bytes", "increment_bytes", "finite"])
    base = prefill_table[prefill_table.method == "sdpa-full"].set_index("length")
    if not base.empty:
        prefill_table["peak_ratio"] = prefill_table.apply(lambda r: r.peak_bytes / base.peak_bytes[r.length], axis=1)
        prefill_table["increment_ratio"] = prefill_table.apply(
            lambda r: r.increment_bytes / base.increment_bytes[r.length], axis=1
        )
        prefill_table["time_ratio"] = prefill_table.apply(lambda r: r.seconds / base.seconds[r.length], axis=1)
    for col in ("peak_bytes", "increment_bytes"):
        prefill_table[col.replace("bytes", "mib")] = (prefill_table.pop(col) / 2**20).round(1)

    device = torch.device(args.device)
    model = build_model(args)
    decode_rows = []
    def median_ms(cfg, budget):
        return statistics.median(decode_step_times(model, cfg, budget, args.decode_steps, device)) * 1e3

    for budget in decode_budgets:
        sdpa_ms = median_ms(None, budget)  # transformers' DynamicCache holding C tokens
        full_ms = median_ms(METHODS["full"], budget)  # kvbench's cache holding C tokens, no policy
        for method in args.decode_methods.split(","):
            ms = median_ms(METHODS[method], budget)
            decode_rows.append({
                "method": method, "budget": budget, "step_ms": round(ms, 3),
                "sdpa_full_step_ms": round(sdpa_ms, 3), "kvbench_full_step_ms": round(full_ms, 3),
                "ratio_vs_sdpa_full": round(ms / sdpa_ms, 3), "ratio_vs_kvbench_full": round(ms / full_ms, 3),
            })
    decode_table = pd.DataFrame(decode_rows)

    shape = (f"hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads}, "
             f"{args.dtype}, {args.device}, budget {args.budget}")
    print(f"\nPrefill + compress ({shape}):\n")
    print(prefill_table.to_markdown(index=False, floatfmt=".3f"))
    print(f"\nDecode step at budget C vs a full sdpa cache of C tokens ({args.decode_steps} steps, median):\n")
    print(decode_table.to_markdown(index=False, floatfmt=".3f"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefill_table.to_csv(out / f"prefill_{args.device.split(':')[0]}.csv", index=False)
    decode_table.to_csv(out / f"decode_{args.device.split(':')[0]}.csv", index=False)
    print(f"\nwrote {out}/prefill_*.csv and {out}/decode_*.csv")


if __name__ == "__main__":
    main()
