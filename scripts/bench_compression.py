"""Every method: peak memory and time of prefill + compress, decode-step time and aten ops per decode step.

    python scripts/bench_compression.py --quick                          # CPU, every method, < 5 minutes
    python scripts/bench_compression.py                                  # CPU defaults: 1k..16k tokens
    python scripts/bench_compression.py --lengths 1024,4096 --methods sdpa-full,h2o,vatp,snapkv
    python scripts/bench_compression.py --ops-only --decode-budgets 256   # op counts only, seconds, no timing
    python scripts/bench_compression.py --device cuda --hidden 4096 --layers 32 --heads 32 --kv-heads 32 \\
        --intermediate 11008 --lengths 4096,8192,16384,32768           # 7B shape, random weights, bf16

Prefill: for each context length and method (every registered method, per-head
ones included; HeadKV with random skewed head scores), a fresh process builds
a random Llama of the given shape, prefills the prompt through kvbench's cache
(each layer compacted to `--budget` right after its attention) and reports its
peak memory (CUDA max allocated, or the process's peak RSS on the CPU) and
time. `sdpa-full` is a plain transformers sdpa prefill with its DynamicCache.

Decode: a prompt of 2C tokens is compressed to C (decode-stage methods evict
one token per step; per-head methods decode on their ragged store), then
`--decode-steps` steps are timed, with each of `--threads`. Baselines hold C
tokens without compression: plain transformers (`sdpa-full`) and kvbench's own
cache with `full` (the policy's overhead alone). Medians, in one process. One
more step runs under a TorchDispatchMode that counts the aten ops dispatched
per layer (the GPU launch-count proxy; `kernel ops` leaves out views).
`--ops-only` skips the prefill and the timing and prints, per method, the op
count and which ops it dispatches beyond kvbench's full cache (per layer).

`--quick` times the prefills in one process (medians of 5; peak memory needs the
fresh processes of a full run). Every result is appended to `--out`/{prefill,decode}_<device>.jsonl as soon as
it is measured (a crash loses nothing; a failing method is a row with its
error), and the tables are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvbench.check import (
    DECODE_STAGE,
    DUO_FOLDER,
    QFILTER_FOLDER,
    REPEAT,
    build_model,
    method_configs,
    sync,
    write_random_duo_pattern,
    write_random_head_scores,
    write_random_qfilters,
)
from kvbench.engine import cache_argument

VIEW_OPS = {"view", "_unsafe_view", "slice", "select", "narrow", "unsqueeze", "squeeze", "expand", "expand_as",
            "transpose", "t", "permute", "alias", "reshape", "as_strided", "values", "lift_fresh", "detach"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (views apart: they launch no kernel on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        return sum(n for op, n in self.ops.items() if op.rstrip("_") not in VIEW_OPS)


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

    from kvbench.engine import Budget, Session, install
    from kvbench.methods import build

    if method_cfg is None:
        model.set_attn_implementation("sdpa")
        out = model(input_ids=ids, **cache_argument(model, DynamicCache(config=model.config)), use_cache=True, logits_to_keep=1)
        return out.logits
    install(model, "sdpa")
    return Session(model, build(method_cfg), Budget(tokens=budget), repeat=REPEAT).prefill(ids)


def child(args) -> None:
    """One prefill measurement in this (fresh) process; prints one JSON line."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args)
    cfg = method_configs(args.scores)[args.method]
    ids = torch.randint(4, 260, (1, args.length), device=device)
    prefill(model, cfg, ids[:, :64], args.budget)  # warm up kernels at a small size
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    start = time.perf_counter()
    logits = prefill(model, cfg, ids, args.budget)
    sync(device)
    seconds = time.perf_counter() - start
    peak = peak_bytes(device)
    print(json.dumps({
        "method": args.method, "length": args.length, "budget": args.budget, "seconds": round(seconds, 3),
        "peak_bytes": peak, "increment_bytes": peak - base, "finite": bool(torch.isfinite(logits).all()),
    }))


def prefill_in_process(model, cfg, method: str, length: int, args, repeats: int = 5) -> dict:
    """`--quick`: the median time of `repeats` prefills in this process (no peak memory: that needs a fresh one)."""
    device = torch.device(args.device)
    ids = torch.randint(4, 260, (1, length), device=device, generator=torch.Generator(device).manual_seed(0))
    prefill(model, cfg, ids[:, :64], args.budget)
    times = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            logits = prefill(model, cfg, ids, args.budget)
            sync(device)
            times.append(time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 - the benchmark goes on; the row says what failed
        return {"method": method, "length": length, "error": f"{type(error).__name__}: {error}"[:300]}
    return {"method": method, "length": length, "budget": args.budget, "seconds": round(statistics.median(times), 4),
            "finite": bool(torch.isfinite(logits).all())}


def run_child(args, method: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--method", method, "--length", str(length), "--scores", args.scores]
    for key in ("budget", "hidden", "intermediate", "layers", "heads", "kv_heads", "dtype", "device", "max_length"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"method": method, "length": length, "error": out.stderr.strip().splitlines()[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


@torch.inference_mode()
def decode_steps(model, method_cfg, budget: int, steps: int, device) -> tuple[list[float], OpCounter]:
    """Per-step seconds of `steps` decode steps at budget C (after 3 warm-up steps), and the ops of one more."""
    from transformers import DynamicCache

    from kvbench.engine import Budget, Session, install
    from kvbench.methods import build

    torch.manual_seed(1)
    if method_cfg is None:  # plain sdpa over a full cache of `budget` tokens
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
        ids = torch.randint(4, 260, (1, budget), device=device)
        logits = model(input_ids=ids, **cache_argument(model, cache), use_cache=True, logits_to_keep=1).logits

        def step(token):
            return model(input_ids=token, **cache_argument(model, cache), use_cache=True).logits
    else:
        install(model, "sdpa")
        cfg = {"stage": "decode", **method_cfg} if method_cfg["name"] in DECODE_STAGE else method_cfg
        session = Session(model, build(cfg), Budget(tokens=budget), reserve=steps + 8, repeat=REPEAT)
        prompt = budget if method_cfg["name"] == "full" else 2 * budget  # full: a cache of exactly C tokens
        logits = session.prefill(torch.randint(4, 260, (1, prompt), device=device))
        step = session.step
    times = []
    for i in range(steps + 3):
        token = logits[:, -1].argmax(-1)[:, None]
        sync(device)
        start = time.perf_counter()
        logits = step(token)
        sync(device)
        if i >= 3:  # warm-up steps are not counted
            times.append(time.perf_counter() - start)
    counter = OpCounter()
    with counter:
        step(logits[:, -1].argmax(-1)[:, None])
    return times, counter


def ops_only(model, configs: dict, methods: list[str], budgets: list[int], layers: int, device) -> None:
    """Print the aten ops per layer of one decode step per method, and which ops each adds over `full`."""
    for budget in budgets:
        counts = {}
        for method in ["full", *[m for m in methods if m not in ("full", "sdpa-full")]]:
            counts[method] = decode_steps(model, configs[method], budget, 0, device)[1]
        full = counts["full"]
        print(f"\nC = {budget}: aten ops per layer per decode step (kernels), and the difference from full:\n")
        for method, ops in counts.items():
            extra = {op: (n - full.ops[op]) / layers for op, n in (ops.ops | full.ops).items()
                     if n != full.ops[op] or op not in ops.ops}
            extra = {op: d for op, d in sorted(extra.items(), key=lambda kv: -abs(kv[1])) if d}
            print(f"{method:14s} {ops.total / layers:6.1f} ({ops.kernels / layers:5.1f})  "
                  f"{(ops.total - full.total) / layers:+6.1f}  " + " ".join(f"{op}{d:+g}" for op, d in extra.items()))


def append_row(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def add_model_arguments(parser) -> None:
    """The random model's shape, dtype and device, and the output folder (shared with bench_ragged.py)."""
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/bench")


def ratio_columns(table, base_method: str, on: str, value: str, name: str, combine=lambda v, b: v / b):
    """table[name] = combine(table[value], the `base_method` row's value with the same `on`) (NaN without one)."""
    base = table[table.method == base_method].set_index(on)[value]
    table[name] = [combine(v, base[k]) if k in base.index else float("nan") for k, v in zip(table[on], table[value])]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU preset, < 5 minutes on 2 cores: prefill 1024 -> 128 "
                        "timed in this process (median of 5, no peak memory), decode at C = 1024")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--methods", default="all", help="comma-separated, or all (every registered method)")
    parser.add_argument("--budget", type=int, default=512, help="tokens kept per head after the prompt")
    parser.add_argument("--decode-budgets", default="1024,4096", help="cache sizes C for the decode-step timing")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--decode-methods", default="all", help="comma-separated, or all (every compressing method)")
    parser.add_argument("--ops-only", action="store_true", help="print the op counts per method (at "
                        "--decode-budgets) and which ops each adds over kvbench's full cache; no timing")
    parser.add_argument("--threads", default="1,0", help="CPU thread counts for the decode timing (0: torch's default)")
    add_model_arguments(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scores", help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.budget, args.decode_budgets, args.decode_steps = "1024", 128, "1024", 8
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    decode_budgets = [int(x) for x in args.decode_budgets.split(",") if x]
    args.max_length = args.max_length or max(lengths + [2 * b for b in decode_budgets])
    if args.child:
        child(args)
        return

    import pandas as pd
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.scores = write_random_head_scores(out / "random_head_scores.json", args.layers, args.heads)
    write_random_duo_pattern(out / DUO_FOLDER, args.layers, args.kv_heads)
    write_random_qfilters(out / QFILTER_FOLDER, args.layers, args.kv_heads, args.hidden // args.heads)
    configs = method_configs(args.scores)
    methods = list(configs) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in configs]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(configs)}")
    if args.ops_only:
        ops_only(build_model(args), configs, methods, decode_budgets, args.layers, torch.device(args.device))
        return
    kind = args.device.split(":")[0]
    prefill_path, decode_path = out / f"prefill_{kind}.jsonl", out / f"decode_{kind}.jsonl"
    prefill_path.unlink(missing_ok=True)
    decode_path.unlink(missing_ok=True)

    device = torch.device(args.device)
    model = build_model(args)
    rows = []
    for length, method in tqdm([(n, m) for n in lengths for m in methods], desc="prefill", unit="run"):
        rows.append(prefill_in_process(model, configs[method], method, length, args) if args.quick
                    else run_child(args, method, length))
        append_row(prefill_path, rows[-1])
    prefill_table = pd.DataFrame(rows)
    if "seconds" in prefill_table:
        for base in ("sdpa-full", "snapkv", "h2o"):
            ratio_columns(prefill_table, base, "length", "seconds", f"time_vs_{base}")
    if "peak_bytes" in prefill_table:
        ratio_columns(prefill_table, "sdpa-full", "length", "peak_bytes", "peak_vs_sdpa-full")
        ratio_columns(prefill_table, "sdpa-full", "length", "increment_bytes", "increment_vs_sdpa-full")
        for col in ("peak_bytes", "increment_bytes"):
            prefill_table[col.replace("bytes", "mib")] = (prefill_table.pop(col) / 2**20).round(1)

    default_threads = torch.get_num_threads()
    decode_methods = [m for m in configs if m not in ("sdpa-full", "full", "snapkv")] \
        if args.decode_methods == "all" else args.decode_methods.split(",")
    decode_rows = []
    jobs = [(t, c, m) for t in [int(x) for x in args.threads.split(",")] for c in decode_budgets
            for m in ["sdpa-full", "full", "snapkv", *decode_methods]]
    for threads, budget, method in tqdm(jobs, desc="decode", unit="run"):
        torch.set_num_threads(threads or default_threads)
        row = {"method": method, "budget": budget, "threads": threads or default_threads}
        try:
            times, ops = decode_steps(model, configs[method], budget, args.decode_steps, device)
            row.update(step_ms=round(statistics.median(times) * 1e3, 3), ops_per_layer=ops.total / args.layers,
                       kernel_ops_per_layer=ops.kernels / args.layers)
        except Exception as error:  # noqa: BLE001 - the benchmark goes on; the row says what failed
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        decode_rows.append(row)
        append_row(decode_path, row)
    torch.set_num_threads(default_threads)
    decode_table = pd.DataFrame(decode_rows)
    if "step_ms" in decode_table:
        decode_table["case"] = list(zip(decode_table.budget, decode_table.threads))
        ratio_columns(decode_table, "full", "case", "step_ms", "step_vs_kvbench_full")
        ratio_columns(decode_table, "sdpa-full", "case", "step_ms", "step_vs_sdpa_full")
        ratio_columns(decode_table, "h2o", "case", "step_ms", "step_vs_h2o")
        ratio_columns(decode_table, "full", "case", "ops_per_layer", "ops_minus_full", lambda v, b: v - b)
        decode_table = decode_table.drop(columns="case")

    shape = (f"hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads}, "
             f"{args.dtype}, {args.device}")
    print(f"\nPrefill + compress to {args.budget} tokens per head ({shape}):\n")
    print(prefill_table.to_markdown(index=False, floatfmt=".3f"))
    print(f"\nDecode step at cache C ({args.decode_steps} steps, median; ops: aten ops per layer in one step):\n")
    print(decode_table.to_markdown(index=False, floatfmt=".3f"))
    prefill_table.to_csv(out / f"prefill_{kind}.csv", index=False)
    decode_table.to_csv(out / f"decode_{kind}.csv", index=False)
    print(f"\nwrote {out}/prefill_{kind}.{{jsonl,csv}} and {out}/decode_{kind}.{{jsonl,csv}}")


if __name__ == "__main__":
    main()
