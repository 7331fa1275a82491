"""Batched evaluation throughput: samples/s and new tokens/s at batch 1/4/8/16, and agreement with batch 1.

    python scripts/bench_batch.py                                   # SmolLM2-135M on the CPU (fetched once)
    python scripts/bench_batch.py --model random --device cuda --dtype bfloat16   # 7B shape, random weights
    make gpu-check                                                  # kvbench check, then this at 7B shape

For each method (full cache, StreamingLLM, SnapKV, H2O at decode stage by default) and each batch size, one
process decodes the same `--prompts` requests (prompt lengths drawn between half and all of
`--prompt-tokens`, `--new` new tokens each, no stop token) with `kvbench.engine.batch.decode_together`: each
prompt prefilled alone, the decode steps of up to `batch` sequences in one forward pass. Reported: wall
seconds, samples/s, new tokens/s, the speed-up over batch 1 measured in the same run, and the share of
sequences whose tokens equal batch 1's (1.0 in float32; in bf16 a batched matrix product may round
differently). A warm-up pass runs first. Rows are appended to `--out`/batch_<device>.jsonl as measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvbench.engine import Budget
from kvbench.engine.batch import Request, decode_together
from kvbench.methods import build

METHODS = {
    "full": ({"name": "full"}, None),
    "streamingllm": ({"name": "streamingllm"}, "budget"),
    "snapkv": ({"name": "snapkv"}, "budget"),
    "h2o+decode": ({"name": "h2o", "stage": "decode"}, "budget"),
}


def load_model(args):
    if args.model == "random":
        from kvbench.check import build_model

        big = args.device == "cuda"  # a 7B-shaped model on a GPU, a narrow one on the CPU
        shape = argparse.Namespace(hidden=4096 if big else 256, intermediate=11008 if big else 704,
                                   layers=32 if big else 4, heads=32 if big else 8, kv_heads=32 if big else 8,
                                   max_length=args.prompt_tokens + args.new, device=args.device, dtype=args.dtype)
        model = build_model(shape)
        return model, model.config.vocab_size
    import yaml

    from kvbench.engine import install
    from kvbench.models import load
    from kvbench.resources import CONFIG_DIR

    spec = yaml.safe_load((CONFIG_DIR / "model" / f"{args.model}.yaml").read_text())
    model, tokenizer = load({**spec, "cache_dir": None, "dtype": args.dtype, "device": args.device, "seed": 0})
    install(model, "sdpa")
    return model, len(tokenizer)


def requests(args, vocab: int) -> list[Request]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.prompt_tokens // 2, args.prompt_tokens + 1, (args.prompts,), generator=g)
    return [Request(torch.randint(100, vocab - 1, (1, int(n)), generator=g), args.new, (), args.new)
            for n in lengths]


def run(model, reqs, settings, budget, batch) -> tuple[float, dict[int, list[int]]]:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    tokens = {i: d.tokens for i, d in decode_together(model, reqs, build(settings), budget, batch)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, tokens


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a configs/model name, or random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on the CPU")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--prompts", type=int, default=16, help="requests per measure")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new", type=int, default=32, help="new tokens per request")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    torch.set_num_threads(args.threads)
    model, vocab = load_model(args)
    reqs = requests(args, vocab)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / f"batch_{args.device}.jsonl"
    batches = [int(b) for b in args.batches.split(",")]
    run(model, reqs[:2], {"name": "full"}, None, 2)  # warm-up
    print(f"{args.model} {args.dtype} on {args.device}: {args.prompts} prompts of {args.prompt_tokens // 2}-"
          f"{args.prompt_tokens} tokens, {args.new} new tokens each, budget {args.budget}\n")
    print("| method | batch | wall s | samples/s | new tokens/s | vs batch 1 | same tokens as batch 1 |")
    print("|:--|--:|--:|--:|--:|--:|--:|")
    for name in args.methods.split(","):
        settings, budgeted = METHODS[name]
        budget = Budget(tokens=args.budget) if budgeted else None
        base_seconds, base_tokens = None, None
        for batch in batches:
            seconds, tokens = run(model, reqs, settings, budget, batch)
            if base_tokens is None:
                base_seconds, base_tokens = seconds, tokens
            same = sum(tokens[i] == base_tokens[i] for i in tokens) / len(tokens)
            new = sum(len(t) for t in tokens.values())
            row = {"method": name, "batch": batch, "seconds": round(seconds, 3), "samples_per_s": len(tokens) / seconds,
                   "new_tokens_per_s": new / seconds, "speedup": base_seconds / seconds, "same_as_batch1": same,
                   "model": args.model, "dtype": args.dtype, "device": args.device, "prompts": args.prompts,
                   "prompt_tokens": args.prompt_tokens, "new": args.new, "budget": args.budget}
            with rows_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"| {name} | {batch} | {seconds:.2f} | {row['samples_per_s']:.2f} | {row['new_tokens_per_s']:.1f} "
                  f"| {row['speedup']:.2f}x | {same:.2f} |", flush=True)


if __name__ == "__main__":
    main()
