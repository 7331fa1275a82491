"""What HeadKV, Ada-SnapKV and PyramidKV share: SnapKV selection with a budget per (layer, head).

In every head, the last `w` prompt queries (the observation window, w = 8 as in
KVCache-Factory and HeadKV) score the prefix j < L - w:

    a_j  = mean over the window queries i of A_ij           (GQA: averaged over the group)
    s_j  = max(a_{j-3}, ..., a_{j+3})                       (max-pool, kernel 7, stride 1, same padding)
    keep = {top cap_h prefix tokens by s} ∪ {the w window tokens}

The methods differ only in `prefix_caps`, the number of prefix tokens cap_h each
head keeps out of B = C - w per head on average. Heads of one layer then hold
different numbers of tokens, so the engine moves the layer to a ragged store
(`kvbench.ragged`): the bytes stored are the sum of the heads' budgets.
Prefill only; decoded tokens are appended to every head, never evicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench import KVBenchError
from kvbench.attention import StatsRequest
from kvbench.methods.base import Method
from kvbench.methods.snapkv import max_pool


@dataclass(frozen=True)
class ModelShape:
    """What a per-head allocation needs to know of the model."""

    num_layers: int
    query_heads: int
    kv_heads: int


@dataclass
class HeadwiseSnapKV(Method):
    window: int = 8
    kernel: int = 7

    per_head: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.stage != "prefill":
            raise KVBenchError(f"{self.name} compresses the prompt only: use method.stage=prefill")
        if self.positions != "original":
            raise KVBenchError(f"{self.name} keeps original positions: use method.positions=original")
        if self.sinks:
            raise KVBenchError(f"{self.name} has no sink tokens: use method.sinks=0")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise KVBenchError(f"method.kernel={self.kernel} must be an odd number >= 1")
        if self.window < 1:
            raise KVBenchError(f"method.window={self.window} must be >= 1")

    def split(self, budget: int) -> tuple[int, int]:
        return 0, min(self.window, budget)

    def stats_request(self, phase: str) -> StatsRequest:
        return StatsRequest(window=self.window) if phase == "prefill" else StatsRequest()

    def prefill_scores(self, layer, stats):
        """Pooled window attention on the prefix; the window itself scores +inf (always kept)."""
        n = layer.length  # a fresh cache holds the prompt in position order
        prefix = n - min(self.window, n)
        scores = torch.full_like(stats.window, float("inf"))
        if prefix > 0:
            scores[..., :prefix] = max_pool(stats.window[..., :prefix], self.kernel)
        return scores

    def prefix_caps(self, layer_idx: int, prefix_scores: torch.Tensor, per_head: int,
                    shape: ModelShape) -> torch.Tensor:
        """Prefix tokens each head keeps, (batch, kv_heads) long; they average `per_head` = C - w."""
        raise NotImplementedError

    def head_budgets(self, layer_idx: int, scores: torch.Tensor, budget: int, shape: ModelShape) -> torch.Tensor:
        """Tokens each head keeps, window included, (batch, kv_heads) long, for a prompt longer than `budget`."""
        n = scores.shape[-1]
        w = min(self.window, n)
        if budget <= w:  # no room for the prefix: every head keeps the last `budget` tokens (as SnapKV)
            return torch.full(scores.shape[:2], budget, dtype=torch.long, device=scores.device)
        caps = self.prefix_caps(layer_idx, scores[..., : n - w], budget - self.window, shape)
        return caps.clamp(0, n - w) + w
