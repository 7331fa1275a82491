"""Per-head budgets (HeadKV, Ada-SnapKV, PyramidKV): bytes the ragged store really holds, and decode speed.

    python scripts/bench_ragged.py                                      # CPU, small random Llama
    python scripts/bench_ragged.py --device cuda --dtype bfloat16 --hidden 4096 --layers 32 --heads 32 \\
        --kv-heads 32 --intermediate 11008 --length 16384 --budgets 128,512,2048    # 7B shape, random weights

For each budget C and method, one prompt of `--length` tokens is prefilled
through kvbench's cache, then `--steps` decode steps are timed. Reported, all
as ratios to a full cache of the same prompt measured in the same run:

- `stored`: bytes of K and V the store holds (the packed heads + decoded tokens);
- `padded`: what a dense store needs if every head of a layer is padded to the
  layer's largest head (the cheapest dense alternative to a ragged store);
- `masked`: masking a full-size cache per head (KVPress's head-wise budgets) = 1.0;
- `step`: median decode-step time ÷ SnapKV's at the same C (uniform heads, dense store).

With CUDA and flash-attn it also runs each ragged method with the padded
fallback forced and prints the largest logit difference and the time ratio.
HeadKV here uses random head scores (skewed: u^4), so only memory and speed are
meaningful, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_compression import add_model_arguments, build_model  # the same random model, same options

from kvbench import ragged
from kvbench.cache import Budget, CompressedCache
from kvbench.generation import forward
from kvbench.headscores import write_head_scores
from kvbench.methods import build


def store_bytes(cache: CompressedCache) -> tuple[int, int]:
    """(bytes of K and V holding tokens, the same if each layer's heads were padded to its longest); batch 1."""
    kv = cache.kv_summary()
    per_token = kv["kv_kept_bytes"] // kv["kv_kept_tokens"]
    padded = sum(len(heads) * max(heads) for heads in kv["kv_kept_per_layer_head"]) * per_token
    return kv["kv_kept_bytes"], padded


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run(model, method_cfg, ids, budget, steps, device):
    cache = CompressedCache(model, build(method_cfg), Budget(tokens=budget), reserve=steps + 1)
    logits = forward(model, cache, ids)[:, -1]
    cache.phase = "decode"
    times, outputs = [], []
    for _ in range(steps):
        token = logits.argmax(-1)[:, None]
        sync(device)
        start = time.perf_counter()
        logits = forward(model, cache, token)[:, -1]
        sync(device)
        times.append(time.perf_counter() - start)
        outputs.append(logits.float())
    full_bytes = cache.kv_summary()["kv_full_bytes"]
    return cache, statistics.median(times[1:] or times), torch.stack(outputs), full_bytes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--budgets", default="128,512")
    parser.add_argument("--methods", default="headkv,ada_snapkv,pyramidkv")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 gives steadier times on a busy machine)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    args.max_length = args.length + args.steps
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    torch.manual_seed(0)
    model = build_model(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores_path = out / "random_head_scores.json"
    importance = torch.rand(args.layers, args.heads) ** 4
    write_head_scores(scores_path, {(layer, h): [float(importance[layer, h])] for layer in range(args.layers) for h in range(args.heads)})
    configs = {
        "snapkv": {"name": "snapkv", "window": 8},
        "headkv": {"name": "headkv", "head_scores": str(scores_path)},
        "ada_snapkv": {"name": "ada_snapkv"},
        "pyramidkv": {"name": "pyramidkv"},
    }
    ids = torch.randint(4, 30000 if args.hidden >= 4096 else 250, (1, args.length), device=args.device)
    varlen = ragged.flash_attn_varlen_func is not None and args.device == "cuda"
    rows = []
    print(f"prompt {args.length} tokens, {args.layers} layers x {args.kv_heads} KV heads, {args.dtype} on {args.device}"
          f"; ragged attention: {'flash_attn_varlen_func' if varlen else 'padded fallback'}")
    print(f"{'C':>6} {'method':<11} {'stored':>8} {'padded':>8} {'masked':>7} {'step':>7}" + ("  fallback:maxdiff,time" if varlen else ""))
    for budget in [int(b) for b in args.budgets.split(",")]:
        _, snap_step, _, _ = run(model, configs["snapkv"], ids, budget, args.steps, args.device)
        for name in args.methods.split(","):
            cache, step, logits, full_bytes = run(model, configs[name], ids, budget, args.steps, args.device)
            stored, padded = store_bytes(cache)
            row = {"budget": budget, "method": name, "stored_over_full": stored / full_bytes,
                   "padded_over_full": padded / full_bytes, "masked_over_full": 1.0, "step_over_snapkv": step / snap_step}
            line = (f"{budget:>6} {name:<11} {row['stored_over_full']:>8.4f} {row['padded_over_full']:>8.4f} "
                    f"{1.0:>7.1f} {row['step_over_snapkv']:>7.2f}")
            if varlen:
                saved = ragged.flash_attn_varlen_func
                ragged.flash_attn_varlen_func = None
                try:
                    _, fallback_step, fallback_logits, _ = run(model, configs[name], ids, budget, args.steps, args.device)
                finally:
                    ragged.flash_attn_varlen_func = saved
                row["fallback_max_logit_diff"] = float((fallback_logits - logits).abs().max())
                row["fallback_step_over_varlen"] = fallback_step / step
                line += f"  {row['fallback_max_logit_diff']:.3g}, {row['fallback_step_over_varlen']:.2f}x"
            print(line)
            rows.append(row)
    (out / "ragged.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out / 'ragged.json'}")


if __name__ == "__main__":
    main()
