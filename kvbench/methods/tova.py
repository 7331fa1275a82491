"""TOVA — Oren et al., "Transformers are Multi-State RNNs", arXiv:2401.06104.

Token Omission Via Attention: keep the C tokens the current query attends to
most, averaged over all heads of the layer, re-selected at every step:

    a_j  = mean over heads h of A^h_{t,j}      (t = the last query)
    keep = top C by a;  at decode, evict argmin_j a_j while over C

No sinks and no recent window; all heads of a layer keep the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.engine.types import StatsRequest
from kvbench.methods.base import Method


@dataclass
class TOVA(Method):
    stage: str = "decode"

    name: ClassVar[str] = "tova"
    query_aware: ClassVar[bool] = True
    cost: ClassVar[str] = "the last query's attention row, every step"
    reference: ClassVar[str] = "arXiv:2401.06104; schwartz-lab-NLP/TOVA"
    slot_state: ClassVar[tuple[str, ...]] = ("score",)
    rewritten_state: ClassVar[tuple[str, ...]] = ("score",)  # every step's row replaces every score

    def stats_request(self, phase: str) -> StatsRequest:
        return StatsRequest(window=1) if phase == "prefill" else StatsRequest(row=True)

    def _store_head_mean(self, layer, attention):
        return layer.view("score").copy_(attention.mean(dim=1, keepdim=True))

    def prefill_scores(self, layer, stats):
        return self._store_head_mean(layer, stats.window)

    def decode_update(self, layer, stats) -> None:
        self._store_head_mean(layer, stats.row)

    def eviction_scores(self, layer):
        return layer.view("score")
