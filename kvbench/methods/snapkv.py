"""SnapKV — Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv:2404.14469.

Each head keeps what the end of the prompt looks at. With an observation
window of the last w prompt queries (w = 32) and the prefix j < L - w:

    a_j  = mean over the window queries i of A_ij           (GQA: averaged over the group)
    s_j  = max(a_{j-3}, ..., a_{j+3})                       (max-pool, kernel 7, stride 1, same padding)
    keep = {top C - w prefix tokens by s} ∪ {the w window tokens}

Prefill only (KVCache-Factory's setting); decoded tokens are appended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvbench import KVBenchError
from kvbench.attention import StatsRequest
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

    def __post_init__(self):
        super().__post_init__()
        if self.stage != "prefill":
            raise KVBenchError("snapkv compresses the prompt only: use method.stage=prefill")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise KVBenchError(f"method.kernel={self.kernel} must be an odd number >= 1")
        if self.window < 1:
            raise KVBenchError(f"method.window={self.window} must be >= 1")

    def split(self, budget: int) -> tuple[int, int]:
        sinks = min(self.sinks, budget)
        return sinks, min(self.window, budget - sinks)

    def stats_request(self, phase: str) -> StatsRequest:
        return StatsRequest(window=self.window) if phase == "prefill" else StatsRequest()

    def prefill_scores(self, layer, stats):
        # slots hold the prompt in position order at prefill (a fresh cache)
        w = min(self.window, layer.length)
        scores = torch.zeros_like(stats.window)
        prefix = layer.length - w
        if prefix > 0:
            scores[..., :prefix] = max_pool(stats.window[..., :prefix], self.kernel)
        return scores
