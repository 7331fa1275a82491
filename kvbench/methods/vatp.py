"""VATP — Guo et al., "Attention Score is not All You Need for Token Importance Indicator in KV Cache
Reduction: Value Also Matters", arXiv:2406.12335 (code: guozhiyu/vatp).

Importance is the attention score times the norm of the token's value vector:

    I_j = s_j · ||v_j||_1          (norm over head_dim of that head's value; `norm: l1 | l2 | linf`)

- `base: h2o` (default): s_j is H2O's accumulated attention (prompt column
  sums, then each decode row added); even heavy/recent split.
- `base: scissorhands` (as the VATP code runs it): the prompt score is the summed
  attention of the last `window` (400) prompt queries divided by `window`, also
  when the prompt has fewer than `window` queries (VATP's code,
  utils_hh/modify_llama.py, `LlamaAttention_heavy_hitter.forward`, divides the
  window's sum by the constant 400); recent window `recent_window` (10); for a
  ratio budget r of the prompt length L, heavy = 2·⌊(r/2)·L⌋ − 10; decode rows
  are added on top.
- the first `sinks` (20) tokens are always kept: they are flagged as protected
  (sink tokens have tiny value norms, which is the paper's point), never given
  a huge score. They count inside the budget.
- The paper's 50% budget is `budget=ratio budget.ratio=0.5` (heavy 25% + recent 25%).

Remaining differences from VATP's code (which masks a full cache instead of
evicting, one decision per decode step):
- order within a step: the reference chooses the tokens the *next* query may
  see before that query arrives, so each query attends to C tokens counting
  itself (heavy + 9 older recent tokens + itself); kvbench appends the new
  token, attends to C + 1 tokens and then evicts back to C. The recent window
  protects the 10 newest tokens in both.
- the token that leaves the reference's recent window is masked for one step
  but keeps its score and may be chosen again the step after; kvbench ranks it
  with the other candidates at once (a real cache cannot hold a masked token
  for free).
- the reference scores in the model dtype (fp16: `softmax(..., float32)` cast
  back to fp16, summed in fp16); kvbench accumulates scores in float32.
- ties: the reference takes `topk` order (unspecified among equals); kvbench
  keeps the newer token at the prompt cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.types import StatsRequest
from kvbench.errors import KVBenchError
from kvbench.methods.h2o import H2O

BASES = ("h2o", "scissorhands")
NORMS = {"l1": 1, "l2": 2, "linf": math.inf, "none": None}


@dataclass
class VATP(H2O):
    sinks: int = 20
    base: str = "h2o"
    norm: str = "l1"
    window: int = 400  # scissorhands: the last `window` prompt queries score the prompt (their sum / window)
    recent_window: int = 10  # scissorhands: the recent window

    name: ClassVar[str] = "vatp"
    query_aware: ClassVar[bool] = True
    cost: ClassVar[str] = "H2O's (or Scissorhands') attention plus value norms"
    reference: ClassVar[str] = "arXiv:2406.12335; guozhiyu/vatp"
    rewritten_state: ClassVar[tuple[str, ...]] = ("vnorm",)  # written for every new token

    @property
    def slot_state(self) -> tuple[str, ...]:
        return ("score",) if NORMS[self.norm] is None else ("score", "vnorm")

    def __post_init__(self):
        super().__post_init__()
        if self.base not in BASES:
            raise KVBenchError(f"method.base={self.base} is not one of: {', '.join(BASES)}")
        if self.norm not in NORMS:
            raise KVBenchError(f"method.norm={self.norm} is not one of: {', '.join(NORMS)}")

    @property
    def label(self) -> str:
        label = self.name if self.base == "h2o" else f"{self.name}-{self.base}"
        return (label if self.norm in ("l1", "none") else f"{label}-{self.norm}") + self.heads_suffix

    def heavy_recent(self, budget, prompt_len):
        if self.base == "h2o":
            return super().heavy_recent(budget, prompt_len)
        if budget.ratio is not None and prompt_len is not None:
            total = 2 * math.floor(budget.ratio / 2 * prompt_len)
        else:
            total = budget.resolve(prompt_len)
        recent = min(self.recent_window, total)
        return max(total - recent, 0 if recent else 1), recent

    def stats_request(self, phase: str) -> StatsRequest:
        if phase == "prefill" and self.base == "scissorhands":
            return StatsRequest(window=self.window)
        return super().stats_request(phase)

    def store_value_norms(self, layer, start: int) -> None:
        """||v_j|| of the tokens in slots start.. (computed once per token, kept as per-token state)."""
        p = NORMS[self.norm]
        if p is not None:
            n = layer.length - start
            values = layer.part("values", start, n)
            values = values if values.dtype == torch.float32 else values.float()
            torch.linalg.vector_norm(values, ord=p, dim=-1, out=layer.part("vnorm", start, n))

    def importance(self, layer):
        if NORMS[self.norm] is None:
            return layer.view("score")
        return layer.view("score") * layer.view("vnorm")

    def prefill_scores(self, layer, stats):
        if self.base == "scissorhands":
            # stats.window is the mean over min(window, L) queries; the reference divides the sum by `window`
            seen = min(self.window, stats.n_queries)
            layer.view("score")[:] = stats.window * (seen / self.window)
        else:
            layer.view("score")[:] = stats.colsum
        self.store_value_norms(layer, 0)
        return self.importance(layer)

    def decode_update(self, layer, stats) -> None:
        super().decode_update(layer, stats)
        self.store_value_norms(layer, layer.length - stats.n_queries)

    def eviction_scores(self, layer):
        return self.importance(layer)


@dataclass
class Scissorhands(VATP):
    """Scissorhands (Liu et al., arXiv:2305.17118) as the VATP code runs it: VATP's `base: scissorhands`
    scoring without the value norm and without protected sinks."""

    sinks: int = 0
    base: str = "scissorhands"
    norm: str = "none"

    name: ClassVar[str] = "scissorhands"
    query_aware: ClassVar[bool] = True
    cost: ClassVar[str] = "attention of the last `window` queries, accumulated"
    reference: ClassVar[str] = "arXiv:2305.17118 (as guozhiyu/vatp runs it)"

    @property
    def label(self) -> str:
        return self.name + self.heads_suffix
