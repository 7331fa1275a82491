"""The first thing to run on a CUDA machine: every method on a random Llama-2-7B-shaped model, checked and timed.

    make gpu-check                                  # or: kvbench check
    kvbench check --lengths 4096                    # one length only

On CUDA: a random Llama of Llama-2-7B's shape (32 layers, 4,096 wide, 32 heads,
bf16) at 4k, 16k and 32k tokens. On a machine without CUDA the same code runs
on a narrow model at short lengths, and the report says it is a CPU run (it
checks the code paths, not a GPU).

For each length, a plain transformers sdpa prefill + decode is the baseline;
then every registered method (HeadKV with random skewed head scores) runs
prefill + `--steps` greedy decode steps twice:

- compressed to 1/8 of the prompt: no error, finite logits, and time and peak
  memory (CUDA max allocated) as ratios to the baseline;
- with a budget above the prompt (nothing is compressed), on the full cache's
  tokens: the logits must stay within bf16's noise of kvbench's full cache
  (10% of the largest logit; a random model's logits are so flat that a greedy
  token can flip on one rounding), and whether every argmax agrees is reported;
  KIVI and ThinK compress at any budget: their difference is reported only.

With flash-attn installed it also runs the full cache on `flash_attention_2`
and checks each per-head method's varlen path against the sparse fallback.
Last, tiny random models of the hybrid families (a Mistral-v0.1-style window,
Gemma 2's softcap, Gemma 3's 5:1 layers, gpt-oss's sinks) run on the device in
fp32 with a budget above the prompt: the model's own logits and tokens.
Writes one JSON and one markdown report under `--out`; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from kvbench.engine import Budget, Session, cache_argument, install
from kvbench.engine.types import RepeatPrompts
from kvbench.methods import REGISTRY, build
from kvbench.methods.head_scores import write_head_scores
from kvbench.methods.qfilter import save_filters
from kvbench.models.loading import build_tiny

DECODE_STAGE = ("streamingllm", "h2o", "vatp", "scissorhands", "tova", "weightedkv", "knorm", "keydiff", "random",
                "qfilter", "cake")  # evict while decoding
PER_HEAD = ("headkv", "ada_snapkv", "pyramidkv")  # prefill cut, ragged store at decode


GPU_SHAPE = {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "lengths": "4096,16384,32768"}
CPU_SHAPE = {"hidden": 128, "intermediate": 344, "layers": 2, "heads": 8, "kv_heads": 2, "lengths": "256,1024"}


# ----------------------------------------------------------------------------- shared with scripts/bench_*.py


def method_configs(scores_path: str) -> dict:
    """Every registered method (its registry defaults), the wrappers on a scorer (CriticalKV, CriticalAdaKV,
    PyramidKV layer budgets, ChunkKV, ThinK, KIVI), plus the plain transformers baseline. HeadKV reads the score file
    `scores_path`; DuoAttention and QFilter the random pattern and filters beside it
    (write_random_duo_pattern, write_random_qfilters), if there."""
    configs = {"sdpa-full": None}
    folder = Path(scores_path).parent
    files = {"duo_attention": ("patterns", folder / DUO_FOLDER), "qfilter": ("filters", folder / QFILTER_FOLDER)}
    for name in REGISTRY:
        if name in files and not files[name][1].is_dir():
            continue
        extra = {"headkv": {"head_scores": scores_path}}.get(name, {})
        if name in files:
            extra = {files[name][0]: str(files[name][1])}
        configs[name] = {"name": name, **extra}
    configs.update(WRAPPER_RUNS)
    return configs


WRAPPER_RUNS = {  # the settings that compose with any scorer, on representative ones
    "snapkv-critical": {"name": "snapkv", "critical": True},
    "expected_attention-ada-critical": {"name": "expected_attention", "use_vnorm": False, "heads": "ada",
                                        "critical": True},
    "knorm-pyramid": {"name": "knorm", "stage": "prefill", "layers": "pyramid"},
    "knorm-cake": {"name": "knorm", "stage": "prefill", "layers": "cake"},
    "knorm-chunk10": {"name": "knorm", "stage": "prefill", "chunk": 10},
    "snapkv-think0.5": {"name": "snapkv", "key_channels": 0.5},
    "snapkv-kivi4": {"name": "snapkv", "quant": "kivi4", "quant_group": 8, "quant_residual": 32},  # any head dim
    "h2o-kivi2": {"name": "h2o", "quant": "kivi2", "quant_group": 8, "quant_residual": 32},  # evicts from the store
}
QFILTER_FOLDER = "random_qfilters"


def write_random_qfilters(folder: Path, layers: int, kv_heads: int, head_dim: int) -> Path:
    """Q-Filters in kvpress's layout (model.safetensors + config.json), random unit directions: for timings,
    never for scores."""
    g = torch.Generator().manual_seed(0)
    return save_filters(folder, torch.nn.functional.normalize(torch.randn(layers, kv_heads, head_dim, generator=g),
                                                              dim=-1))


DUO_FOLDER = "random_duo_pattern"


def write_random_duo_pattern(folder: Path, layers: int, kv_heads: int, sink: int = 4, recent: int = 4) -> Path:
    """A DuoAttention pattern in the published format (full_attention_heads.tsv + config.json) with uniform
    random head values and a small streaming window: for timings, never for scores."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    values = torch.rand(layers, kv_heads, generator=g)
    (folder / "full_attention_heads.tsv").write_text(
        "\n".join("\t".join(f"{v:.4f}" for v in row.tolist()) for row in values) + "\n")
    (folder / "config.json").write_text(json.dumps({"sink_size": sink, "recent_size": recent,
                                                    "model_name": "random (timings only)"}))
    return folder


def write_random_head_scores(path: Path, layers: int, heads: int, skew: float = 4.0) -> str:
    """HeadKV scores u**skew (u uniform): a skew like the published ones (the longest head 3-4x the mean)."""
    g = torch.Generator().manual_seed(0)
    importance = torch.rand(layers, heads, generator=g) ** skew
    path.parent.mkdir(parents=True, exist_ok=True)
    write_head_scores(path, {(layer, h): [float(importance[layer, h])] for layer in range(layers) for h in range(heads)})
    return str(path)


# bf16 noise between attention kernels, as a share of the largest logit of a random model (nearly flat logits): on an
# H200 at 8k, kvbench's own blocked attention (the column-sum methods) vs sdpa's flash kernel differed by 5.3%; a
# wrong mask or a lost token differs by 30-100%
REL_TOLERANCE = 0.1
# KVzip's prompts on a model without a tokenizer: token ids of about the length of its words
REPEAT = RepeatPrompts(0, torch.arange(10, 19), torch.arange(20, 34), torch.arange(40, 45))


def build_model(args):
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


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


@torch.inference_mode()
def run_plain(model, ids, steps, device) -> dict:
    """Plain transformers sdpa prefill + greedy decode with its DynamicCache: the baseline."""
    from transformers import DynamicCache

    model.set_attn_implementation("sdpa")
    cache = DynamicCache(config=model.config)
    peak_reset(device)
    start = time.perf_counter()
    logits = model(input_ids=ids, **cache_argument(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    sync(device)
    prefill_s, tokens, step_s = time.perf_counter() - start, [], []
    for _ in range(steps):
        token = logits.argmax(-1)[:, None]
        tokens.append(int(token))
        start = time.perf_counter()
        logits = model(input_ids=token, **cache_argument(model, cache), use_cache=True).logits[:, -1]
        sync(device)
        step_s.append(time.perf_counter() - start)
    return {"prefill_s": prefill_s, "step_s": sorted(step_s)[len(step_s) // 2], "peak": peak(device), "tokens": tokens,
            "logits": logits.float(), "finite": bool(torch.isfinite(logits).all())}


@torch.inference_mode()
def run_kvbench(model, cfg, ids, budget, steps, device, base="sdpa", forced: list[int] | None = None) -> dict:
    """kvbench's cache: prefill (compressed to `budget`) + greedy decode (or the `forced` tokens, teacher-forced);
    the same fields as `run_plain`, and `all_logits` (steps + 1, vocab) float32 of the prompt and every step."""
    install(model, base)
    session = Session(model, build(cfg), Budget(tokens=budget), reserve=steps, repeat=REPEAT)
    peak_reset(device)
    start = time.perf_counter()
    logits = session.prefill(ids)[:, -1]
    sync(device)
    prefill_s, tokens, step_s, finite = time.perf_counter() - start, [], [], bool(torch.isfinite(logits).all())
    all_logits = [logits.float()]
    for i in range(steps):
        token = logits.argmax(-1)[:, None] if forced is None else torch.tensor([[forced[i]]], device=device)
        tokens.append(int(token))
        start = time.perf_counter()
        logits = session.step(token)[:, -1]
        sync(device)
        step_s.append(time.perf_counter() - start)
        finite &= bool(torch.isfinite(logits).all())
        all_logits.append(logits.float())
    return {"prefill_s": prefill_s, "step_s": sorted(step_s)[len(step_s) // 2], "peak": peak(device), "tokens": tokens,
            "logits": logits.float(), "all_logits": torch.cat(all_logits), "finite": finite, "cache": session.cache}


def same_as_full(above: dict, full: dict) -> dict:
    """A run with nothing to compress against the full cache's, on the full run's tokens (teacher-forced): the
    largest logit difference, as a share of the largest logit, and whether every step's argmax agrees. A random
    model's logits are nearly flat, so one bf16 rounding can flip a greedy token and everything after it: the
    check passes when the difference is within bf16's noise (REL_TOLERANCE of the largest logit)."""
    diff = float((above["all_logits"] - full["all_logits"]).abs().max())
    scale = float(full["all_logits"].abs().max()) or 1.0
    return {"same_tokens_above_budget": bool((above["all_logits"].argmax(-1) == full["all_logits"].argmax(-1)).all()),
            "max_logit_diff_above_budget": diff, "rel_logit_diff_above_budget": diff / scale,
            "close_above_budget": diff <= REL_TOLERANCE * scale}


def check_length(model, configs, length, steps, device, vocab) -> list[dict]:
    ids = torch.randint(4, vocab, (1, length), device=device, generator=torch.Generator(device).manual_seed(length))
    run_plain(model, ids[:, :64], 2, device)  # warm-up: the first forward pass pays for kernel selection
    plain = run_plain(model, ids, steps, device)
    full = run_kvbench(model, configs["full"], ids, length + steps + 8, steps, device)
    full.pop("cache")  # its tokens and logits are the reference; its KV would count in every later peak
    rows = [{"length": length, "method": "sdpa-full (transformers)", "ok": plain["finite"], "finite": plain["finite"],
             "prefill_s": plain["prefill_s"], "step_s": plain["step_s"], "peak_bytes": plain["peak"]}]
    for name, cfg in configs.items():
        if cfg is None:
            continue
        row = {"length": length, "method": name}
        try:
            small = run_kvbench(model, cfg, ids, max(16, length // 8), steps, device)
            above = full if name == "full" else run_kvbench(model, cfg, ids, length + steps + 8, steps, device,
                                                            forced=full["tokens"])
            row.update(
                finite=small["finite"] and above["finite"],
                **same_as_full(above, full),
                prefill_vs_sdpa=small["prefill_s"] / plain["prefill_s"], step_vs_sdpa=small["step_s"] / plain["step_s"],
                peak_vs_sdpa=None if plain["peak"] is None else small["peak"] / plain["peak"],
                prefill_s=small["prefill_s"], step_s=small["step_s"], peak_bytes=small["peak"],
            )
            if name == "full":
                row["same_tokens_as_transformers"] = full["tokens"] == plain["tokens"]
            if name in PER_HEAD:
                row.update(varlen_check(small["cache"], device))
            small, above = None, None  # free both caches before the next method's peak is measured
            method = build(cfg)
            if method.quant != "none" or method.key_channels:  # KIVI / ThinK compress at any budget
                row["close_above_budget"] = None
            row["ok"] = row["finite"] and row["close_above_budget"] is not False and row.get("varlen_ok", True)
        except Exception as error:  # noqa: BLE001 - the check goes on; the row says what failed
            row.update(ok=False, error=f"{type(error).__name__}: {error}"[:300])
        rows.append(row)
    if device.type == "cuda" and flash_attn_installed():
        try:
            flash = run_kvbench(model, configs["full"], ids, length + steps + 8, steps, device, base="flash_attention_2")
            rows.append({"length": length, "method": "full on flash_attention_2", "finite": flash["finite"],
                         "ok": flash["finite"] and flash["tokens"] == full["tokens"],
                         "max_logit_diff_vs_sdpa": float((flash["logits"] - full["logits"]).abs().max())})
        except Exception as error:  # noqa: BLE001
            rows.append({"length": length, "method": "full on flash_attention_2", "ok": False, "error": str(error)[:300]})
    return rows


HYBRID_FAMILIES = ("mistral_window", "gemma2", "gemma3_text", "gpt_oss")


def family_rows(device, steps: int) -> list[dict]:
    """Sliding-window, softcapped and sink layers on this device: tiny random models of the hybrid families
    (fp32), the full cache, H2O and SnapKV at a budget above the prompt against the model itself."""
    from kvbench.models.families import compare_with_model, tiny_model

    rows = []
    prompt = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(1)).to(device)
    for family in HYBRID_FAMILIES:
        model = tiny_model(family).to(device)
        for name in ("full", "h2o", "snapkv"):
            row = {"length": 40, "method": f"{family} {name} (fp32)"}
            try:
                result = compare_with_model(model, {"name": name}, prompt, steps, 40 + steps + 8)
                row.update(finite=True, same_tokens_above_budget=result["same_tokens"],
                           max_logit_diff_above_budget=result["max_logit_diff"],
                           ok=result["same_tokens"] and result["max_logit_diff"] <= 1e-4)
            except Exception as error:  # noqa: BLE001 - the check goes on; the row says what failed
                row.update(ok=False, error=f"{type(error).__name__}: {error}"[:300])
            rows.append(row)
    return rows


def flash_attn_installed() -> bool:
    from kvbench.engine import ragged

    return ragged.flash_attn_varlen_func is not None


def varlen_check(cache, device) -> dict:
    """With flash-attn on CUDA: one layer's varlen attention against the sparse fallback on a fresh query."""
    layer = next((layer for layer in cache.layers if layer.ragged is not None), None)
    if layer is None or device.type != "cuda" or not flash_attn_installed():
        return {"varlen": "not run (needs CUDA and flash-attn)" if layer is not None else "dense (prompt fits)"}
    store = layer.ragged
    query = torch.randn(store.batch, cache.shape.query_heads, 1, store.head_dim, device=device,
                        dtype=store.prefix_keys.dtype)
    diff = float((store._varlen(query, store.head_dim**-0.5).float() - store._sparse(query, store.head_dim**-0.5)).abs().max())
    return {"varlen_max_diff": diff, "varlen_ok": diff < 5e-2}


def markdown(report: dict) -> str:
    lines = [f"# kvbench gpu check — {report['run']}", "", f"- device: {report['device']}", f"- model: {report['model']}",
             f"- torch {report['torch']}, transformers {report['transformers']}, flash-attn: {report['flash_attn']}",
             f"- result: **{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}**", ""]
    columns = ["length", "method", "ok", "finite", "same_tokens_above_budget", "max_logit_diff_above_budget",
               "rel_logit_diff_above_budget",
               "prefill_vs_sdpa", "step_vs_sdpa", "peak_vs_sdpa", "varlen_max_diff", "error"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in report["rows"]:
        cells = [row.get(c, "") for c in columns]
        lines.append("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", default=None, help="default: 4096,16384,32768 on CUDA, 256,1024 on the CPU")
    parser.add_argument("--steps", type=int, default=8, help="greedy decode steps per run")
    parser.add_argument("--out", default="results/gpu_check")
    parser.add_argument("--methods", default=None, help="only these rows (comma-separated; full always runs)")
    for key in ("hidden", "intermediate", "layers", "heads", "kv_heads"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    shape = GPU_SHAPE if on_gpu else CPU_SHAPE
    for key, value in shape.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.dtype = "bfloat16"
    lengths = [int(x) for x in args.lengths.split(",")]
    args.max_length = max(lengths) + args.steps + 16
    out = Path(args.out)
    write_random_duo_pattern(out / DUO_FOLDER, args.layers, args.kv_heads)
    write_random_qfilters(out / QFILTER_FOLDER, args.layers, args.kv_heads, args.hidden // args.heads)
    configs = method_configs(write_random_head_scores(out / "random_head_scores.json", args.layers, args.heads))
    if args.methods:
        chosen = {"sdpa-full", "full", *args.methods.split(",")}
        if chosen - set(configs):
            raise SystemExit(f"kvbench check: --methods {', '.join(sorted(chosen - set(configs)))} unknown; choose "
                             f"from {', '.join(configs)}")
        configs = {name: cfg for name, cfg in configs.items() if name in chosen}
    model = build_model(args)
    vocab = model.config.vocab_size
    run = "GPU run" if on_gpu else "CPU run on a narrow model (checks the code paths, not a GPU)"
    print(f"{run}: {args.layers} layers x {args.hidden} wide, heads {args.heads}/{args.kv_heads}, bf16, "
          f"lengths {lengths}, {args.steps} decode steps", flush=True)
    rows = []
    for length in lengths:
        rows += check_length(model, configs, length, args.steps, device, vocab)
        bad = [r["method"] for r in rows if r["length"] == length and not r.get("ok")]
        print(f"  {length} tokens: {len(rows)} rows so far; failed: {', '.join(bad) or 'none'}", flush=True)
    rows += family_rows(device, args.steps)
    import transformers

    report = {
        "run": run, "ok": all(r.get("ok") for r in rows),
        "device": torch.cuda.get_device_name(device) if on_gpu else f"CPU ({platform.processor() or platform.machine()})",
        "model": f"random Llama, {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, bf16",
        "torch": torch.__version__, "transformers": transformers.__version__, "flash_attn": flash_attn_installed(),
        "lengths": lengths, "steps": args.steps, "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
