"""SnapKV — Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv:2404.14469.

Each head keeps what the end of the prompt looks at. With an observation
window of the last w prompt queries and the prefix j < L - w:

    a_j  = mean over the window queries i of A_ij           (`gqa: kv`: averaged over the group)
    s_j  = max(a_{j-3}, ..., a_{j+3})                       (max-pool, kernel 7, stride 1, same padding)
    keep = {top C - w prefix tokens by s} ∪ {the w window tokens}

Prefill only; decoded tokens are appended. `window` defaults to 32 (the SnapKV
paper's observation window); KVCache-Factory's LongBench runner
(run_longbench.py) and HeadKV's use window 8 and kernel 7, which the HeadKV
experiment sets.

Head layout (`gqa`):
- `kv` (default): one kept set per KV head, the memory a GQA cache really needs;
  a KV head's query heads average their window attention.
- `expand`: as KVCache-Factory's and HeadKV's code (they `repeat_kv` before
  compressing): every query head scores, chooses and stores its own C tokens,
  so a GQA model stores G = query heads / KV heads times the tokens of `kv`
  (a ragged store with one segment per query head; meta.json counts its bytes).
  Needs `sinks: 0` and `positions: original`.

Remaining differences from KVCache-Factory's SnapKVCluster.update_kv: the
window attention is float32 here (the reference casts the float32 softmax back
to the model dtype before the mean and the pool), and among equal pooled
scores the newer token is kept (the reference takes `topk` order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvbench.engine.types import ModelShape, StatsRequest
from kvbench.errors import KVBenchError
from kvbench.methods.base import Method


def max_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max over each position's `kernel` neighbours along the last axis (same length; edges see fewer)."""
    shape = scores.shape
    pooled = F.max_pool1d(scores.reshape(-1, 1, shape[-1]), kernel_size=kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(shape)


@dataclass
class SnapKV(Method):
    window: int = 32
    kernel: int = 7

    name: ClassVar[str] = "snapkv"
    query_aware: ClassVar[bool] = True
    cost: ClassVar[str] = "attention of the last `window` queries (the question)"
    reference: ClassVar[str] = "arXiv:2404.14469; FasterDecoding/SnapKV"
    adapts: ClassVar[bool] = False  # heads: ada does not apply: its per-head form is ada_snapkv
    expands: ClassVar[bool] = True
    stages: ClassVar[tuple[str, ...]] = ("prefill",)

    def __post_init__(self):
        super().__post_init__()
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise KVBenchError(f"method.kernel={self.kernel} must be an odd number >= 1")
        if self.window < 1:
            raise KVBenchError(f"method.window={self.window} must be >= 1")
        if self.per_head and self.positions != "original":
            raise KVBenchError(f"{self.name} with per-head budgets keeps original positions: use method.positions=original")
        if self.per_head and self.sinks:
            raise KVBenchError(f"{self.name} with per-head budgets has no sink tokens: use method.sinks=0")

    @property
    def per_head(self) -> bool:
        """Heads keep their own sets in a ragged store (always for the subclasses; SnapKV when expanded)."""
        return self.gqa == "expand"

    @property
    def label(self) -> str:
        return self.name if self.gqa == "kv" else f"{self.name}-expand"

    def split(self, budget: int) -> tuple[int, int]:
        sinks = min(self.sinks, budget)
        return sinks, min(self.window, budget - sinks)

    def stats_request(self, phase: str) -> StatsRequest:
        if phase != "prefill":
            return StatsRequest()
        return StatsRequest(window=self.window, per_query_head=self.gqa == "expand")

    def prefill_scores(self, layer, stats):
        """Pooled window attention on the prefix; the window itself is always kept."""
        n = layer.length  # a fresh cache holds the prompt in position order
        prefix = n - min(self.window, n)
        # per-head path: the window must win every head's top-k; the dense path protects it as the recent window
        scores = torch.full_like(stats.window, float("inf") if self.per_head else 0.0)
        if prefix > 0:
            scores[..., :prefix] = max_pool(stats.window[..., :prefix], self.kernel)
        return scores

    def prefix_caps(self, layer_idx: int, prefix_scores: torch.Tensor, per_head: int,
                    shape: ModelShape) -> torch.Tensor:
        """Prefix tokens each head keeps, (batch, heads) long; they average `per_head` = C - w. SnapKV: all equal."""
        return torch.full(prefix_scores.shape[:2], per_head, dtype=torch.long, device=prefix_scores.device)

    def head_budgets(self, layer_idx: int, scores: torch.Tensor, budget: int, shape: ModelShape) -> torch.Tensor:
        """Tokens each head keeps, window included, (batch, heads) long, for a prompt longer than `budget`."""
        n = scores.shape[-1]
        w = min(self.window, n)
        if budget <= w:  # no room for the prefix: every head keeps the last `budget` tokens (as SnapKV)
            return torch.full(scores.shape[:2], budget, dtype=torch.long, device=scores.device)
        caps = self.prefix_caps(layer_idx, scores[..., : n - w], budget - self.window, shape)
        return caps.clamp(0, n - w) + w
