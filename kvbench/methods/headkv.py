"""HeadKV — Fu et al., "Not All Heads Matter: A Head-Level KV Cache Compression Method with
Integrated Retrieval and Reasoning", arXiv:2410.19258 (github.com/FYYFU/HeadKV).

Each head gets a budget from a head-importance score estimated offline
(`scripts/estimate_head_scores.py`; variant R = retrieval, R2 = retrieval-reasoning),
then keeps tokens SnapKV-style (see `headwise.py`). With C the budget per head,
w the window, L layers and H KV heads:

    s      = mean of each head's score list; s <- s / sum(s); s <- s^T / sum(s^T)
    s_kv   = sum of s over the query heads of a KV group              (GQA)
    B      = C - w,  pool = floor(B / beta) * L * H,  floor = B - floor(B / beta)
    cap    = round(s_kv * pool + floor)                               (prefix tokens per head)

so the caps average B; beta -> 1 hands almost the whole budget out by score,
large beta gives every head nearly B. The score file is HeadKV's published
format: one JSON object, keys "layer-head" over query heads, values lists of scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from kvbench import KVBenchError
from kvbench.headscores import load_head_scores
from kvbench.methods.headwise import HeadwiseSnapKV, ModelShape

VARIANTS = ("r", "r2")
SHIPPED_SCORES = Path(__file__).resolve().parent.parent / "assets" / "head_scores"  # <model>_<variant>.json


def find_head_scores(path: str) -> str:
    """`path`, or when no such file exists, the shipped file of the same name (SmolLM2's scores)."""
    shipped = SHIPPED_SCORES / Path(path).name
    return str(shipped) if not Path(path).exists() and shipped.exists() else path


def headkv_caps(importance: torch.Tensor, kv_heads: int, per_head: int, beta: float,
                temperature: float = 1.0) -> torch.Tensor:
    """Prefix caps (layers, kv_heads) long from head importance (layers, query_heads); see the module docstring."""
    layers, query_heads = importance.shape
    s = importance.double().clamp(min=0)
    s = s / s.sum() if s.sum() > 0 else torch.full_like(s, 1 / s.numel())
    s = s.pow(temperature)
    s = s / s.sum()
    s = s.view(layers, kv_heads, query_heads // kv_heads).sum(dim=-1)
    kept_by_score = math.floor(per_head / beta)
    pool = kept_by_score * layers * kv_heads
    floor = per_head - kept_by_score
    return torch.round(s * pool + floor).long()


@dataclass
class HeadKV(HeadwiseSnapKV):
    head_scores: str | None = None  # path to a score file ("layer-head" -> list of scores)
    beta: float = 1.005
    temperature: float = 1.0
    variant: str = "r2"  # which estimate the file holds: r (retrieval) or r2 (retrieval-reasoning); a label

    name: ClassVar[str] = "headkv"
    _importance: torch.Tensor | None = field(default=None, init=False, repr=False)
    _caps: dict = field(default_factory=dict, init=False, repr=False)  # (B, kv_heads, device) -> all layers' caps

    def __post_init__(self):
        super().__post_init__()
        if not self.head_scores:
            raise KVBenchError(
                "headkv needs a head-score file: method.head_scores=PATH "
                "(make one with scripts/estimate_head_scores.py)"
            )
        if self.variant not in VARIANTS:
            raise KVBenchError(f"method.variant={self.variant} is not one of: {', '.join(VARIANTS)}")
        if self.beta < 1:
            raise KVBenchError(f"method.beta={self.beta} must be >= 1")
        if self.temperature <= 0:
            raise KVBenchError(f"method.temperature={self.temperature} must be > 0")
        self.head_scores = find_head_scores(self.head_scores)
        self._importance = load_head_scores(self.head_scores)

    @property
    def label(self) -> str:
        label = f"headkv-{self.variant}"
        if self.beta != 1.005:
            label += f"-beta{self.beta:g}"
        if self.temperature != 1.0:
            label += f"-t{self.temperature:g}"
        return label

    def prefix_caps(self, layer_idx, prefix_scores, per_head, shape: ModelShape):
        importance = self._importance
        if tuple(importance.shape) != (shape.num_layers, shape.query_heads):
            raise KVBenchError(
                f"head scores in {self.head_scores} cover {importance.shape[0]} layers x {importance.shape[1]} "
                f"heads but the model has {shape.num_layers} x {shape.query_heads}; estimate scores for this "
                "model with scripts/estimate_head_scores.py"
            )
        key = (per_head, shape.kv_heads, prefix_scores.device)
        if key not in self._caps:  # once per budget, not once per layer and prompt
            caps = headkv_caps(importance, shape.kv_heads, per_head, self.beta, self.temperature)
            self._caps[key] = caps.to(prefix_scores.device)
        return self._caps[key][layer_idx].expand(prefix_scores.shape[0], -1)
