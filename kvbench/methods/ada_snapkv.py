"""Ada-SnapKV — Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation
for Efficient LLM Inference", arXiv:2407.11550, as HeadKV runs it as a baseline.

Heads of a layer share the layer's budget H * B (B = C - w per head) by a
global top-k over all their pooled window scores, with a floor for every head.
As HeadKV's official code (headkv/snapkv_utils.py, `AdaptiveSnapKVCluster.update_kv`,
run with normalize=True, floor 0.2, window 8, kernel 7, skip 0 by run_longbench.py):

    w_h  = (sum of head h's B largest scores) / (sum of all its scores)     (normalize: true)
    n_h  = how many of the layer's H * B largest scores s_hj * w_h lie in head h
    cap  = round(n_h * (1 - alpha) + int(alpha * B))                  (alpha = 0.2, round half to even)

then each head keeps its top cap prefix tokens plus the window (`headwise.py`).
Caps are computed per prompt and per layer, so they differ between sequences.
`normalize: false` is Ada-KV's plain global top-k. H counts KV heads (`gqa: kv`,
the default) or query heads (`gqa: expand`, HeadKV's layout).

Remaining differences from the official code: it computes the scores in the
model dtype (the softmax is cast back to fp16 before the window mean, the pool
and the weighting), kvbench in float32; ties in the global top-k and in a head's
top-k fall in the order `topk` / `sort` happen to give there, the newer token in
kvbench; a prefix exactly B long is compressed there and left alone here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.types import ModelShape
from kvbench.errors import KVBenchError
from kvbench.methods.headwise import HeadwiseSnapKV


def ada_caps(prefix_scores: torch.Tensor, per_head: int, floor: float, normalize: bool = True) -> torch.Tensor:
    """Prefix caps (batch, heads) long from pooled scores (batch, heads, prefix); see the module docstring."""
    batch, heads, prefix = prefix_scores.shape
    scores = prefix_scores.double()
    if normalize:  # each head's scores weighted by the share of its mass in its own top B
        top = scores.topk(min(per_head, prefix), dim=-1).values.sum(dim=-1, keepdim=True)
        scores = scores * (top / scores.sum(dim=-1, keepdim=True))
    chosen = scores.reshape(batch, heads * prefix).topk(min(heads * per_head, heads * prefix), dim=-1).indices
    counts = torch.zeros(batch, heads, dtype=torch.float64, device=prefix_scores.device)
    counts.scatter_add_(1, chosen // prefix, torch.ones_like(chosen, dtype=torch.float64))
    return torch.round(counts * (1 - floor) + int(per_head * floor)).long()


@dataclass
class AdaSnapKV(HeadwiseSnapKV):
    floor: float = 0.2  # alpha: the share of B every head is guaranteed
    normalize: bool = True  # weight each head's scores by its top-B share (HeadKV's runs: normalize=True)

    name: ClassVar[str] = "ada_snapkv"
    query_aware: ClassVar[bool] = True
    cost: ClassVar[str] = "SnapKV's window attention; a ragged store per head"
    reference: ClassVar[str] = "arXiv:2407.11550; FFY0/AdaKV"

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.floor <= 1:
            raise KVBenchError(f"method.floor={self.floor} must be in [0, 1]")

    @property
    def label(self) -> str:
        return super().label + ("" if self.normalize else "-plain")

    def prefix_caps(self, layer_idx, prefix_scores, per_head, shape: ModelShape):
        return ada_caps(prefix_scores, per_head, self.floor, self.normalize)
