"""Per-head budgets (HeadKV, Ada-SnapKV, PyramidKV): bytes the ragged store really holds, and decode speed.

    python scripts/bench_ragged.py --quick                              # CPU: prompt 4096, budget 256, < 5 minutes
    python scripts/bench_ragged.py                                      # CPU, small random Llama, budgets 128,512
    python scripts/bench_ragged.py --device cuda --dtype bfloat16 --hidden 4096 --layers 32 --heads 32 \\
        --kv-heads 32 --intermediate 11008 --length 16384 --budgets 128,512,2048    # 7B shape, random weights

For each budget C and method, one prompt of `--length` tokens is prefilled
through kvbench's cache, then `--steps` decode steps are timed. Reported, all
as ratios measured in the same run:

- `stored`: bytes of K and V the store holds (the packed heads + decoded tokens) / a full cache's;
- `padded`: what a dense store needs if every head of a layer is padded to the
  layer's largest head (the cheapest dense alternative to a ragged store) / full;
- `masked`: masking a full-size cache per head (KVPress's head-wise budgets) = 1.0;
- `step_vs_dense`: median decode-step time / SnapKV's at the same C (a dense
  kvbench store holding the same total tokens, uniform heads);
- `step_vs_full`: / kvbench's full cache of the whole prompt;
- `ops`: aten ops dispatched per layer in one decode step (the GPU launch-count proxy).

`headkv` uses random head scores skewed as the published ones (u^4: the
longest head several times the mean), `headkv-equal` equal scores (every head
the same length, still on the ragged store). With CUDA and flash-attn each
ragged method also runs with the sparse fallback forced: the largest logit
difference and the time ratio. Rows are appended to `--out`/ragged.jsonl as
they are measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_compression import (
    OpCounter,
    add_model_arguments,
    append_row,
    build_model,
    write_random_head_scores,
)

from kvbench.engine import Budget, CompressedCache, Session, ragged
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
    """(cache, median step seconds, logits of every step, full-cache bytes, ops per decode step)."""
    session = Session(model, build(method_cfg), Budget(tokens=budget), reserve=steps + 2)
    logits = session.prefill(ids)[:, -1]
    times, outputs = [], []
    for _ in range(steps):
        token = logits.argmax(-1)[:, None]
        sync(device)
        start = time.perf_counter()
        logits = session.step(token)[:, -1]
        sync(device)
        times.append(time.perf_counter() - start)
        outputs.append(logits.float())
    counter = OpCounter()
    with counter:
        session.step(logits.argmax(-1)[:, None])
    full_bytes = session.kv_summary()["kv_full_bytes"]
    return session.cache, statistics.median(times[1:] or times), torch.stack(outputs), full_bytes, counter.total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU preset: prompt 4096, budget 256, 8 steps")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--budgets", default="128,512")
    parser.add_argument("--methods", default="headkv,headkv-equal,ada_snapkv,pyramidkv")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 gives steadier times on a busy machine)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.length, args.budgets, args.steps = 4096, "256", 8
    args.max_length = args.length + args.steps
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    torch.manual_seed(0)
    model = build_model(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skewed = write_random_head_scores(out / "random_head_scores.json", args.layers, args.heads)
    equal = write_random_head_scores(out / "equal_head_scores.json", args.layers, args.heads, skew=0.0)
    configs = {
        "full": {"name": "full"},
        "snapkv": {"name": "snapkv", "window": 8},
        "headkv": {"name": "headkv", "head_scores": skewed},
        "headkv-equal": {"name": "headkv", "head_scores": equal},
        "ada_snapkv": {"name": "ada_snapkv"},
        "pyramidkv": {"name": "pyramidkv"},
    }
    ids = torch.randint(4, 30000 if args.hidden >= 4096 else 250, (1, args.length), device=args.device)
    varlen = ragged.flash_attn_varlen_func is not None and args.device == "cuda"
    jsonl = out / "ragged.jsonl"
    jsonl.unlink(missing_ok=True)
    rows = []
    print(f"prompt {args.length} tokens, {args.layers} layers x {args.kv_heads} KV heads ({args.heads} query heads), "
          f"{args.dtype} on {args.device}, {torch.get_num_threads()} threads; ragged attention: "
          f"{'flash_attn_varlen_func' if varlen else 'sparse (SDDMM + segment softmax)'}")
    print(f"{'C':>6} {'method':<13} {'stored':>7} {'padded':>7} {'masked':>7} {'step_vs_dense':>13} {'step_vs_full':>12} "
          f"{'ops':>6}" + ("  fallback:maxdiff,time" if varlen else ""))
    _, full_step, _, _, full_ops = run(model, configs["full"], ids, args.length + args.steps + 8, args.steps, args.device)
    for budget in [int(b) for b in args.budgets.split(",")]:
        _, dense_step, _, _, dense_ops = run(model, configs["snapkv"], ids, budget, args.steps, args.device)
        print(f"{budget:>6} {'snapkv':<13} {'':>7} {'':>7} {'':>7} {1.0:>13.2f} {dense_step / full_step:>12.2f} "
              f"{dense_ops / args.layers:>6.1f}   (dense: {dense_step * 1e3:.1f} ms; full {full_step * 1e3:.1f} ms, "
              f"{full_ops / args.layers:.1f} ops)")
        for name in args.methods.split(","):
            cache, step, logits, full_bytes, ops = run(model, configs[name], ids, budget, args.steps, args.device)
            stored, padded = store_bytes(cache)
            row = {"budget": budget, "method": name, "stored_over_full": stored / full_bytes,
                   "padded_over_full": padded / full_bytes, "masked_over_full": 1.0, "step_ms": step * 1e3,
                   "step_vs_dense": step / dense_step, "step_vs_full": step / full_step,
                   "ops_per_layer": ops / args.layers, "dense_ops_per_layer": dense_ops / args.layers,
                   "threads": torch.get_num_threads()}
            line = (f"{budget:>6} {name:<13} {row['stored_over_full']:>7.4f} {row['padded_over_full']:>7.4f} "
                    f"{1.0:>7.1f} {row['step_vs_dense']:>13.2f} {row['step_vs_full']:>12.2f} {row['ops_per_layer']:>6.1f}")
            if varlen:
                saved = ragged.flash_attn_varlen_func
                ragged.flash_attn_varlen_func = None
                try:
                    _, fallback_step, fallback_logits, _, _ = run(model, configs[name], ids, budget, args.steps, args.device)
                finally:
                    ragged.flash_attn_varlen_func = saved
                row["fallback_max_logit_diff"] = float((fallback_logits - logits).abs().max())
                row["fallback_step_over_varlen"] = fallback_step / step
                line += f"  {row['fallback_max_logit_diff']:.3g}, {row['fallback_step_over_varlen']:.2f}x"
            print(line, flush=True)
            rows.append(row)
            append_row(jsonl, row)
    (out / "ragged.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out / 'ragged.json'} (and {jsonl.name}, row by row)")


if __name__ == "__main__":
    main()
