"""H2O — Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs", arXiv:2306.14048.

Heavy hitters by accumulated attention, plus a recent window:

    s_j = sum_i A_ij            over every prompt query i that sees key j (causal)
    keep = {the R most recent} ∪ {top C - R of the others by s}

- decode (`stage: decode`): each step adds the new query's attention row
  (softmax over the kept keys) to s; while the cache is over C, the token with
  the lowest s outside the recent window is evicted, and its score is gone.
- the split is even by default, R = C/2 (`recent_fraction`). A ratio budget r
  is split as the reference code does: heavy = ⌊r·(1-f)·L⌋, recent = ⌊r·f·L⌋
  of the prompt length L. No sinks by default; `sinks_in_recent` takes them out
  of the recent share, as WeightedKV's baselines do (4 + (C/2 - 4) + C/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from kvbench.engine.types import StatsRequest
from kvbench.errors import KVBenchError
from kvbench.methods.base import Method


@dataclass
class H2O(Method):
    stage: str = "decode"
    recent_fraction: float = 0.5  # share of the budget that is the recent window
    sinks_in_recent: bool = False  # take the sinks out of the recent share (WeightedKV's layout: 4 + C/2-4 + C/2)

    name: ClassVar[str] = "h2o"
    query_aware: ClassVar[bool] = True
    cost: ClassVar[str] = "column sums of every query's attention (one blocked pass at the prompt, the row at decode)"
    reference: ClassVar[str] = "arXiv:2306.14048; FMInference/H2O"
    slot_state: ClassVar[tuple[str, ...]] = ("score",)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise KVBenchError(f"method.recent_fraction={self.recent_fraction} must be in [0, 1]")

    def heavy_recent(self, budget, prompt_len: int | None) -> tuple[int, int]:
        """(heavy, recent) token counts for this prompt."""
        if budget.ratio is not None and prompt_len is not None:
            recent = math.floor(budget.ratio * self.recent_fraction * prompt_len)
            heavy = math.floor(budget.ratio * (1 - self.recent_fraction) * prompt_len)
            return max(heavy, 1 if recent == 0 else 0), recent
        total = budget.resolve(prompt_len)
        recent = math.floor(total * self.recent_fraction)
        return total - recent, recent

    def allocate(self, budget, prompt_len):
        if budget.tokens is None and budget.ratio is None:
            return None, 0, 0
        heavy, recent = self.heavy_recent(budget, prompt_len)
        total = heavy + recent
        if self.sinks_in_recent:
            sinks = min(self.sinks, recent)
            return total, sinks, recent - sinks
        return total, min(self.sinks, total - recent), recent

    @property
    def label(self) -> str:
        label = f"{self.name}-sink{self.sinks}" if self.sinks else self.name  # VATP and Scissorhands override
        return label + self.heads_suffix

    def stats_request(self, phase: str) -> StatsRequest:
        return StatsRequest(colsum=True) if phase == "prefill" else StatsRequest(row=True)

    def accumulated(self, layer, stats):
        """Store the prompt's column sums as each token's accumulated score; return them."""
        layer.view("score")[:] = stats.colsum
        return layer.view("score")

    def prefill_scores(self, layer, stats):
        return self.accumulated(layer, stats)

    def decode_update(self, layer, stats) -> None:
        layer.view("score").add_(stats.row)

    def eviction_scores(self, layer):
        return layer.view("score")
