"""Knorm — Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
EMNLP 2024 (arXiv:2406.11430); reference code: NVIDIA kvpress `KnormPress`.

Keys of low L2 norm draw the most attention, so keep the C tokens of lowest key norm, per KV head:

    s_j  = -||k_j||_2        (the key as the cache stores it, after RoPE: a rotation keeps its norm)
    keep = top C by s

No attention statistic is needed (it runs with any attention kernel) and the question plays no part:
a query-agnostic method. As kvpress: no sinks and no recent window (`method.sinks` adds sinks), the norm
in the keys' own dtype. Ties: kvpress leaves them to `torch.topk`; kvbench keeps the more recent token.
`stage: decode` ranks the cache by the same score at every step (kvpress compresses the prompt only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.methods.base import Method


@dataclass
class Knorm(Method):
    name: ClassVar[str] = "knorm"
    query_aware: ClassVar[bool] = False
    cost: ClassVar[str] = "key norms (no attention)"
    reference: ClassVar[str] = "arXiv:2406.11430; kvpress KnormPress"

    def prefill_scores(self, layer, stats):
        return -layer.view("keys").norm(dim=-1)

    def eviction_scores(self, layer):
        return -layer.view("keys").norm(dim=-1)
