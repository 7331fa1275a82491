"""Ada-SnapKV — Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation
for Efficient LLM Inference", arXiv:2407.11550, as run in HeadKV's comparison.

Heads of a layer share the layer's budget H * B (B = C - w per head) by a
global top-k over all their pooled window scores, with a floor for every head:

    n_h = number of the top H * B scores of the layer (all heads pooled) that fall in head h
    cap = round(n_h * (1 - alpha) + floor(alpha * B))                 (alpha = 0.2)

then each head keeps its top cap prefix tokens plus the window (`headwise.py`).
Caps are computed per prompt and per layer, so they differ between sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench import KVBenchError
from kvbench.methods.headwise import HeadwiseSnapKV, ModelShape


def ada_caps(prefix_scores: torch.Tensor, per_head: int, floor: float) -> torch.Tensor:
    """Prefix caps (batch, heads) long from pooled scores (batch, heads, prefix); see the module docstring."""
    batch, heads, prefix = prefix_scores.shape
    top = prefix_scores.reshape(batch, heads * prefix).topk(min(heads * per_head, heads * prefix), dim=-1).indices
    counts = torch.zeros(batch, heads, dtype=torch.float64, device=prefix_scores.device)
    counts.scatter_add_(1, top // prefix, torch.ones_like(top, dtype=torch.float64))
    return torch.round(counts * (1 - floor) + math.floor(floor * per_head)).long()


@dataclass
class AdaSnapKV(HeadwiseSnapKV):
    floor: float = 0.2  # alpha: the share of B every head is guaranteed

    name: ClassVar[str] = "ada_snapkv"

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.floor <= 1:
            raise KVBenchError(f"method.floor={self.floor} must be in [0, 1]")

    def prefix_caps(self, layer_idx, prefix_scores, per_head, shape: ModelShape):
        return ada_caps(prefix_scores, per_head, self.floor)
