"""PyramidKV — Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", arXiv:2406.02069, with KVCache-Factory's layer schedule.

Lower layers keep more than upper ones, on an arithmetic schedule whose mean is
B = C - w (prefix tokens per head), for a prefix of P = L_prompt - w tokens:

    lo = floor(B / beta),  hi = 2B - lo                      (beta = 20)
    if hi >= P:  hi = P,  lo = 2B - hi
    step = floor((hi - lo) / (layers - 1)),  cap_l = hi - l * step

Every head of layer l keeps its top cap_l prefix tokens plus the window
(`headwise.py`), so the layers of the ragged store differ in length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.types import ModelShape
from kvbench.errors import KVBenchError
from kvbench.methods.headwise import HeadwiseSnapKV
from kvbench.methods.layers import pyramid_cap


@dataclass
class PyramidKV(HeadwiseSnapKV):
    name: ClassVar[str] = "pyramidkv"
    query_aware: ClassVar[bool] = True
    cost: ClassVar[str] = "SnapKV's window attention; per-layer budgets, ragged store"
    reference: ClassVar[str] = "arXiv:2406.02069; Zefan-Cai/KVCache-Factory"

    def __post_init__(self):
        super().__post_init__()
        if self.pyramid_beta < 1:
            raise KVBenchError(f"method.pyramid_beta={self.pyramid_beta} must be >= 1")

    def prefix_caps(self, layer_idx, prefix_scores, per_head, shape: ModelShape):
        batch, heads, prefix = prefix_scores.shape
        cap = pyramid_cap(layer_idx, shape.num_layers, per_head, prefix, self.pyramid_beta)
        return torch.full((batch, heads), cap, dtype=torch.long, device=prefix_scores.device)
