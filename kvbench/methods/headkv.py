"""HeadKV — Fu et al., "Not All Heads Matter: A Head-Level KV Cache Compression Method with
Integrated Retrieval and Reasoning", arXiv:2410.19258 (github.com/FYYFU/HeadKV).

Each head gets a budget from a head-importance score estimated offline
(`scripts/estimate_head_scores.py`; variant R = retrieval, R2 = retrieval-reasoning),
then keeps tokens SnapKV-style (see `headwise.py`). With C the budget per head,
w the window, L layers and H heads, the caps follow HeadKV's official code
(headkv/snapkv_utils.py, `ReasonSnapKVCluster.__init__`) operation for operation:

    s      = mean of each head's score list; s <- s / sum(s); s <- s^T / sum(s^T)
    B      = C - w
    keep   = B // beta                  (Python float floor division, e.g. 88 // 1.1 = 79.0, not 80)
    pool   = keep * L * H,  floor = B - keep                         (floats)
    cap    = round(s * pool + floor)    (round half to even, as torch.round)   prefix tokens per head

so the caps average B; beta -> 1 hands almost the whole budget out by score,
large beta gives every head nearly B.

Head layout (`gqa`):
- `expand` (HeadKV's code, which repeats the KV heads to every query head before
  compressing): H = query heads, s per query head; every query head chooses and
  stores its own tokens, so a GQA model stores G times the tokens of `kv`.
- `kv` (kvbench's default, the memory a GQA cache really needs): H = KV heads,
  s_kv = sum of s over the query heads of a group; scores averaged over the group.

The score file is HeadKV's published format: one JSON object, keys "layer-head"
over query heads, values lists of scores.

Remaining differences from the official code: a head whose score list is empty
scores 0 (the official np.mean gives NaN), all-zero scores split evenly (NaN
there); scores are matched to heads by their "layer-head" key, not by the order
of the file; the window statistic is float32 (the official casts the softmax to
the model dtype before the mean and the max-pool), and among equal scores the
newer token is kept (the official takes `sort` order); a prompt exactly C long
is compressed there (heads capped below B drop tokens) and left alone here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from kvbench.engine.types import ModelShape
from kvbench.errors import KVBenchError
from kvbench.methods.head_scores import load_head_scores
from kvbench.methods.headwise import HeadwiseSnapKV
from kvbench.resources import ASSETS_DIR

VARIANTS = ("r", "r2")
SHIPPED_SCORES = ASSETS_DIR / "head_scores"  # <model>_<variant>.json


def find_head_scores(path: str) -> str:
    """`path`, or when no such file exists, the shipped file of the same name (SmolLM2's scores)."""
    shipped = SHIPPED_SCORES / Path(path).name
    return str(shipped) if not Path(path).exists() and shipped.exists() else path


def headkv_caps(importance: torch.Tensor, heads: int, per_head: int, beta: float,
                temperature: float = 1.0) -> torch.Tensor:
    """Prefix caps (layers, heads) long from head importance (layers, query_heads); see the module docstring.

    `heads` is the number of heads that keep tokens: the query heads (`gqa: expand`) or the KV heads."""
    layers, query_heads = importance.shape
    flat = [max(0.0, float(x)) for x in importance.flatten().tolist()]
    total = sum(flat)  # the official normalises by Python's sum over the list, layer-major
    s = torch.tensor([x / total for x in flat] if total > 0 else [1 / len(flat)] * len(flat), dtype=torch.float64)
    s = s.pow(temperature)
    s = (s / s.sum()).view(layers, query_heads)
    if heads != query_heads:  # per KV head: a group's query heads pool their shares
        s = s.view(layers, heads, query_heads // heads).sum(dim=-1)
    kept_by_score = per_head // beta  # float floor division, as the official code
    pool = kept_by_score * layers * heads
    floor = per_head - kept_by_score
    return torch.round(s * pool + floor).long()


@dataclass
class HeadKV(HeadwiseSnapKV):
    head_scores: str | None = None  # path to a score file ("layer-head" -> list of scores)
    beta: float = 1.005
    temperature: float = 1.0
    variant: str = "r2"  # which estimate the file holds: r (retrieval) or r2 (retrieval-reasoning); a label

    name: ClassVar[str] = "headkv"
    query_aware: ClassVar[bool] = True
    cost: ClassVar[str] = "SnapKV's window attention; a head-score file (scripts/estimate_head_scores.py); ragged store"
    reference: ClassVar[str] = "arXiv:2410.19258; FYYFU/HeadKV"
    _importance: torch.Tensor | None = field(default=None, init=False, repr=False)
    _caps: dict = field(default_factory=dict, init=False, repr=False)  # (B, heads, device) -> all layers' caps

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
        label = f"headkv-{self.variant}" + ("-expand" if self.gqa == "expand" else "")
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
        heads = prefix_scores.shape[1]  # KV heads, or query heads with gqa: expand
        key = (per_head, heads, prefix_scores.device)
        if key not in self._caps:  # once per budget, not once per layer and prompt
            caps = headkv_caps(importance, heads, per_head, self.beta, self.temperature)
            self._caps[key] = caps.to(prefix_scores.device)
        return self._caps[key][layer_idx].expand(prefix_scores.shape[0], -1)
