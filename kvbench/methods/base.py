"""What every compression method shares; the engine (kvbench.cache) does the rest.

A method is a small dataclass. The engine asks it four things:

- `split(C)`: how many of the budget's C tokens are protected sinks (the first
  positions) and how many form the protected recent window;
- `stats_request(phase)`: which attention statistics the attention function
  must compute in this phase (`prefill` or `decode`);
- `prefill_scores(layer, stats)`: an importance per cached token after the
  prompt (keep the highest), or None to keep the most recent;
- `decode_update(layer, stats)` and `eviction_scores(layer)`: for `stage:
  decode`, fold one step's statistics into the per-token state, and rank the
  tokens for eviction (lowest first).

Protection (sinks, recent window), top-k keep, compaction, slot reuse,
positions and budgets live once in the engine, not in each method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench import KVBenchError
from kvbench.attention import Stats, StatsRequest

STAGES = ("prefill", "decode")
POSITIONS = ("original", "shifted")


@dataclass
class Method:
    stage: str = "prefill"  # prefill: compress once after the prompt; decode: also hold the budget every step
    positions: str = "original"  # original RoPE positions, or shifted: positions inside the cache
    sinks: int = 0  # the first `sinks` positions are always kept

    name: ClassVar[str] = "base"
    compresses: ClassVar[bool] = True
    # per-token tensors the cache keeps for this method, moved with their tokens
    slot_state: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        if self.stage not in STAGES:
            raise KVBenchError(f"method.stage={self.stage} is not one of: {', '.join(STAGES)}")
        if self.positions not in POSITIONS:
            raise KVBenchError(f"method.positions={self.positions} is not one of: {', '.join(POSITIONS)}")
        if self.sinks < 0:
            raise KVBenchError(f"method.sinks={self.sinks} must be >= 0")

    def split(self, budget: int) -> tuple[int, int]:
        """(sinks, recent) protected inside a budget of `budget` tokens; their sum never exceeds it."""
        sinks = min(self.sinks, budget)
        return sinks, 0

    def stats_request(self, phase: str) -> StatsRequest:
        return StatsRequest()

    def prefill_scores(self, layer, stats: Stats) -> torch.Tensor | None:
        return None

    def decode_update(self, layer, stats: Stats) -> None:
        return None

    def eviction_scores(self, layer) -> torch.Tensor:
        """Lowest is evicted first; default: the oldest position (recency)."""
        return layer.state["pos"][:, :, : layer.length].float()
