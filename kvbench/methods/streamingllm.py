"""StreamingLLM — Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453.

Keep the first S attention-sink tokens and the last C - S tokens; drop the middle:

    keep = {j : p_j < S} ∪ {the C - S most recent tokens}

- stage `prefill`: one cut after the prompt. stage `decode`: after each new
  token, drop the oldest non-sink token while the cache holds more than C.
- positions `shifted` (the paper, for text beyond the model's context): keys
  carry their position inside the cache and queries sit at the cache length;
  `original` (KVCache-Factory, KVPress) for LongBench runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.methods.base import Method


@dataclass
class StreamingLLM(Method):
    sinks: int = 4

    name: ClassVar[str] = "streamingllm"
    query_aware: ClassVar[bool] = False
    cost: ClassVar[str] = "none"
    reference: ClassVar[str] = "arXiv:2309.17453; mit-han-lab/streaming-llm"
    adapts: ClassVar[bool] = False  # heads: ada does not apply: recency: no scores

    def split(self, budget: int) -> tuple[int, int]:
        sinks = min(self.sinks, budget)
        return sinks, budget - sinks
