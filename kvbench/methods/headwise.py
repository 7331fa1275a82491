"""What HeadKV, Ada-SnapKV and PyramidKV share: SnapKV selection with a budget per (layer, head).

In every head, the last `w` prompt queries (the observation window, w = 8 as in
KVCache-Factory's and HeadKV's LongBench runners) score the prefix j < L - w:

    a_j  = mean over the window queries i of A_ij           (`gqa: kv`: averaged over the group)
    s_j  = max(a_{j-3}, ..., a_{j+3})                       (max-pool, kernel 7, stride 1, same padding)
    keep = {top cap_h prefix tokens by s} ∪ {the w window tokens}

The methods differ only in `prefix_caps`, the number of prefix tokens cap_h each
head keeps out of B = C - w per head on average. Heads of one layer then hold
different numbers of tokens, so the engine moves the layer to a ragged store
(`kvbench.engine.ragged`): the bytes stored are the sum of the heads' budgets.
`gqa: kv` (default) gives a budget to every KV head; `gqa: expand` to every
query head, as the reference codes do (see `snapkv.py`).
Prefill only; decoded tokens are appended to every head, never evicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.engine.types import ModelShape
from kvbench.methods.snapkv import SnapKV


@dataclass
class HeadwiseSnapKV(SnapKV):
    window: int = 8
    kernel: int = 7

    per_head: ClassVar[bool] = True
    adapts: ClassVar[bool] = False  # their per-head budgets are their own

    def prefix_caps(self, layer_idx, prefix_scores, per_head, shape: ModelShape):
        raise NotImplementedError
