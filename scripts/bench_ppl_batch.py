"""Throughput of `stream` perplexity: documents streamed together as one batch vs one at a time.

    python scripts/bench_ppl_batch.py                       # tiny model, CPU, 8 documents of 512 tokens
    python scripts/bench_ppl_batch.py --batch 8 --tokens 1024 --method weightedkv --budget 128
    python scripts/bench_ppl_batch.py --model smollm2-135m --method full --batch 3 --tokens 64 --threads 2

Prints tokens/s for both and their ratio, measured in one run.
"""

import argparse
import time

import torch

from kvbench.engine import Budget
from kvbench.methods import build
from kvbench.models import load
from kvbench.tasks.perplexity import stream_nll


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a configs/model/ name (CPU, float32)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--method", default="weightedkv")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from omegaconf import OmegaConf

    from kvbench.resources import CONFIG_DIR

    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / f"{args.model}.yaml"))
    cfg.update(seed=0, cache_dir=None, device="cpu", dtype="float32")
    model, _ = load(cfg)
    method = build({"name": args.method, "stage": "decode"} if args.method != "full" else {"name": "full"})
    budget = Budget(tokens=args.budget)
    ids = torch.randint(4, 260, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    stream_nll(model, method, budget, ids[:, :32])  # warm-up

    start = time.perf_counter()
    together = stream_nll(model, method, budget, ids)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    alone = torch.cat([stream_nll(model, method, budget, ids[i : i + 1]) for i in range(args.batch)])
    single_s = time.perf_counter() - start
    tokens = args.batch * (args.tokens - 1)
    print(f"{args.method} budget {args.budget}, {args.batch} documents x {args.tokens} tokens, {args.model}, "
          f"{torch.get_num_threads()} threads")
    print(f"batch of {args.batch}: {tokens / batched_s:,.0f} tokens/s")
    print(f"one at a time: {tokens / single_s:,.0f} tokens/s")
    print(f"ratio: {single_s / batched_s:.2f}x   (max |NLL difference| {float((together - alone).abs().max()):.2e})")


if __name__ == "__main__":
    main()
