"""CAKE — Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences", ICLR 2025
(arXiv:2503.12491); reference code: antgroup/cakekv (commit c4675ce: cake/model/modify_llama.py,
cake/cake_cache.py, cake/utils.py).

Layers get budgets by how spread and how shifting their attention is; inside a layer, tokens rank by the
mean and the variance of the attention the last w prompt queries pay them. With A the softmax rows of the
last w queries (w = `window`, 32) on the L prompt keys, per query head, and P = L - w prefix keys:

    H_l    = -sum A log(A + 1e-10)                  over heads, window queries and prefix keys  (dispersion)
    V_l    = sum over heads and prefix keys of var_i(A_ij)           (unbiased, over the window queries)
    pref_l = H_l^(1/tau1) x V_l^(1/tau2)
    s_j    = mean_i A_ij + gamma x var_i A_ij, average-pooled (kernel 5, zero padding counted) over the
             prefix, then the mean over the query heads of a KV group
    B_l    = adjust(pref_l / sum_k pref_k x (C - w) x layers)     (`adjust_budgets`: int, at most P each,
             the excess and the rounding spread evenly over the other layers, first ones first)
    layer l keeps its top B_l prefix tokens by s and the w window tokens

Cascading (the reference's `--cascading`, the default): at each layer's prompt cut the budgets are
computed over the layers so far (the whole model's total shared among them) and every earlier layer is
cut again to its new budget by its stored scores, so at most one layer holds its whole prompt; a layer
ends at the smallest budget it was given. `cascading: false` cuts every layer once, after the last one.
A prompt of at most C + w tokens is left alone (the reference's test); a budget C <= w shrinks the
window to C - 1 (the reference's total (C - w) x layers turns negative there). `stage: decode`: each layer then
holds B_l + w tokens (B_l its last budget): a step evicts the prefix token with the lowest average-pooled
attention of the new query (the reference's CakeDecodingKVCache_LayerWise). The layer arithmetic
(`preference`, `adjust_budgets`, `cake_budgets`) lives in `kvbench.methods.layers`, which also gives these
layer budgets and their cascade to any scorer with a plain top-k cut (`method.layers=cake`).

Carried over: the entropy and variance formulas (unbiased var, the 1e-10), the total (C - w) x layers, the
budget adjustment rules, the mean + gamma x var indicator, avg-pool 5 with zero padding counted, the group
mean after the pool, the cascade's repeated top-k on the stored scores; per-model taus are the reference's
`model2tau.json` (`configs/method/cake.yaml` lists them). Differences: everything float32 (the reference
casts the softmax to the model dtype); decisions per sequence (the reference sums the preferences over the
batch; the same at batch 1); ties keep the newer token; the decode-stage pool runs over positions (the
reference pools over its cache order, which after a top-k gather is score order, not position order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvbench.engine.budget import Budget
from kvbench.engine.types import StatsRequest
from kvbench.errors import KVBenchError
from kvbench.methods.base import Method
from kvbench.methods.layers import adjust_budgets, cake_budgets, preference

__all__ = ["CAKE", "adjust_budgets", "avg_pool", "preference"]  # the layer arithmetic lives in methods.layers


def avg_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """F.avg_pool1d along the last axis, same length, zero padding counted in the mean (as the reference)."""
    shape = scores.shape
    return F.avg_pool1d(scores.reshape(-1, 1, shape[-1]), kernel, stride=1, padding=kernel // 2).reshape(shape)


@dataclass
class CAKE(Method):
    stage: str = "prefill"
    window: int = 32  # the last `window` prompt queries score; their tokens are always kept
    tau1: float = 1.0  # dispersion temperature (the reference's default; model2tau.json per model and budget)
    tau2: float = 1.0  # shift temperature
    gamma: float = 200.0  # weight of the attention variance in the token score (the reference's default)
    kernel: int = 5
    cascading: bool = True

    name: ClassVar[str] = "cake"
    query_aware: ClassVar[bool] = True
    cost: ClassVar[str] = "attention rows of the last `window` queries; per-layer budgets, earlier layers cut again"
    reference: ClassVar[str] = "arXiv:2503.12491; antgroup/cakekv"
    adapts: ClassVar[bool] = False  # its budgets are per layer
    slot_state: ClassVar[tuple[str, ...]] = ("score",)

    @property
    def cuts_layers_again(self) -> bool:
        return True  # its cascade (with cascading: false, the one cut after the last layer)

    def __post_init__(self):
        super().__post_init__()
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise KVBenchError("method.window must be >= 1 and method.kernel an odd number >= 1")
        if self.tau1 <= 0 or self.tau2 <= 0:
            raise KVBenchError("method.tau1 and method.tau2 must be > 0")
        if self.sinks or self.positions != "original":
            raise KVBenchError("cake keeps its window and its top tokens at their positions: use method.sinks=0 "
                               "method.positions=original")

    def allocate(self, budget: Budget, prompt_len: int | None):
        total = budget.resolve(prompt_len)
        if total is None:
            return None, 0, 0
        window = max(1, min(self.window, total - 1))  # a budget at most w: the window shrinks to C - 1
        if self.stage == "prefill" and prompt_len is not None and prompt_len <= total + window:
            return None, 0, 0  # the reference leaves a prompt of at most C + w tokens alone
        return total, 0, window

    def stats_request(self, phase: str) -> StatsRequest:
        return StatsRequest(window_probs=self.window) if phase == "prefill" else StatsRequest(row=True)

    def prefill_scores(self, layer, stats):
        """s_j for the prefix (the window scores 0: protected), stored for the cascade's later cuts."""
        probs = stats.window_probs[:, :, -(layer.recent or self.window):]  # (batch, query heads, w, n)
        batch, heads, w, n = probs.shape
        token = probs.mean(dim=2) + self.gamma * probs.var(dim=2)
        scores = torch.zeros(batch, heads, n, device=probs.device)
        if n > w:
            scores[..., : n - w] = avg_pool(token[..., : n - w], self.kernel)
        kv_heads = layer.view("pos").shape[1]
        scores = scores.view(batch, kv_heads, heads // kv_heads, n).mean(dim=2)
        layer.view("score").copy_(scores)
        return scores

    def layer_allocations(self, layers, stats, allocation, shape):
        """CAKE's budgets for the layers so far (cascading), or for every layer at the last one."""
        budget, _, recent = allocation
        prompt = layers[-1].seen
        if budget is None or prompt <= budget + self.window:
            return None  # stage decode: a short prompt is cut to C once, by the token scores
        layers[-1].notes["preference"] = preference(stats.window_probs[:, :, -recent:], self.tau1, self.tau2)
        if not self.cascading and len(layers) < shape.num_layers:
            return [None] * (len(layers) - 1) + [(None, 0, 0)]
        budgets = cake_budgets([layer.notes["preference"] for layer in layers], (budget - recent) * shape.num_layers,
                               prompt - recent)
        return [(b + recent, 0, recent) for b in budgets]

    def recut_scores(self, layer):
        return layer.view("score")

    def decode_update(self, layer, stats):
        """The new query's attention, average-pooled over the prefix in position order (the newest w out)."""
        pos = layer.view("pos")
        order = pos.argsort(dim=-1)
        row = stats.row.gather(-1, order)
        n = row.shape[-1]
        pooled, w = torch.full_like(row, float("inf")), layer.recent or self.window
        if n > w:
            pooled[..., : n - w] = avg_pool(row[..., : n - w], self.kernel)
        layer.view("score").scatter_(-1, order, pooled)

    def eviction_scores(self, layer):
        return layer.view("score")
