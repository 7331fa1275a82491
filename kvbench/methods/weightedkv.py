"""WeightedKV — "WeightedKV: Attention Scores Weighted Key-Value Cache Merging for Large Language
Models", arXiv:2503.01330 (no official code; METHODS.md fixes the details).

Evict keys, merge the evicted value into its right neighbour. Per cached token
j: a_j accumulated attention and n_j the number of steps it was attended, kept
apart; its average is ā_j = a_j / n_j.

- each decode step: the new token enters with a = n = 0; the step's attention
  row is added to a and 1 to n of every cached token;
- while over the budget C: among tokens outside the sinks and the recent
  window, j = argmin ā_j; r = the next token in the cache to its right (by
  position);   v_r ← (ā_j v_j + ā_r v_r) / (ā_j + ā_r)   (left as is when the
  sum is 0); k_j, v_j, a_j, n_j are deleted; r keeps its own a_r and n_r;
- budget layout (paper): S = 4 sinks, recent R = C/2 − S, the other C/2 tokens
  are the merge region (C = 1024 → 4 + 508 + 512; C = 256 → 4 + 124 + 128);
- prompt use (LongBench): a_j = Σ_i A_ij over the prompt queries, n_j = the
  number of prompt queries that see j, then the same rule down to C. Merging
  never changes any ā, so the kept set is the top C by ā; the merges, in
  eviction order (lowest ā first, then position), are applied all at once
  (`replay_merges`: they form a tree, whose weights come by pointer jumping).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.types import StatsRequest
from kvbench.methods.base import Method


def merged_value(v_j: torch.Tensor, abar_j: torch.Tensor, v_r: torch.Tensor, abar_r: torch.Tensor) -> torch.Tensor:
    """(ā_j v_j + ā_r v_r) / (ā_j + ā_r), or v_r where ā_j + ā_r = 0. ā broadcast over head_dim.

    Written as v_r + w (v_j - v_r) with w = ā_j / (ā_j + ā_r) (0 where 0/0): one lerp, computed in float32."""
    weight = (abar_j / (abar_j + abar_r)).nan_to_num_(0.0)[..., None]
    if v_r.dtype == torch.float32 and v_j.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.lerp(v_r, v_j, weight)  # (no conversions to dispatch: a decode step runs this per layer)
    return torch.lerp(v_r.float(), v_j.float(), weight.float()).to(v_r.dtype)


def replay_merges(values, abar, keep):
    """Every prompt merge at once: values (B, H, n, d) in position order, ā (B, H, n), keep (B, H, C) slots.

    Evicted tokens go in ascending ā (then position); each merges into its alive right neighbour r,
    v_r <- α v_j + (1 - α) v_r with α = ā_j / (ā_j + ā_r) (0 when both are 0). The merges form a tree: j's
    parent is the nearest token on its right evicted later (or kept), so the children of r arrive nearest
    first, and a kept token ends as a weighted sum of its subtree's original values. The weights follow
    from (1) each node's parent, by pointer jumping; (2) per parent, exclusive products of (1 - α) over
    its children in position order; (3) path products to the root, by pointer jumping. O(log n) steps."""
    batch, heads, n = abar.shape
    device = abar.device
    evicted_count = n - keep.shape[-1]
    big = n + 1  # "time" of kept tokens and of the virtual token n after the last
    time = torch.full((batch, heads, n + 1), big, dtype=torch.long, device=device)
    evicted = torch.ones(batch, heads, n, dtype=torch.bool, device=device)
    evicted.scatter_(2, keep, False)
    order = abar.masked_fill(~evicted, float("inf")).sort(dim=-1, stable=True).indices[..., :evicted_count]
    time.scatter_(2, order, torch.arange(evicted_count, device=device).expand(batch, heads, -1))
    # (1) parent = nearest token on the right with a later time: pointer jumping, tokens between i and
    # nxt[i] are always evicted before i
    nxt = torch.arange(1, n + 2, device=device).clamp(max=n).expand(batch, heads, -1).clone()  # (B, H, n+1)
    nxt[..., n] = n
    while True:
        ahead = time.gather(2, nxt) < time
        ahead[..., n] = False
        ahead &= time < big  # kept tokens are roots
        if not bool(ahead.any()):
            break
        nxt = torch.where(ahead, nxt.gather(2, nxt), nxt)
    parent = torch.where(time < big, nxt, torch.arange(n + 1, device=device))  # roots: themselves
    a = torch.cat([abar.double(), abar.new_zeros(batch, heads, 1).double()], dim=-1)
    a_parent = a.gather(2, parent)
    total = a + a_parent
    alpha = torch.where((total > 0) & (parent != torch.arange(n + 1, device=device)), a / total.clamp(min=1e-300), 0)
    # (2) per parent, siblings in position order: exclusive product of (1 - α) over the siblings on the left
    # (merged later), and ρ_x = product over all children of x (the share of x's own value)
    by_parent = parent.argsort(dim=-1, stable=True)
    f = (1 - alpha).gather(2, by_parent)
    zero = f == 0
    log_f = torch.where(zero, 1.0, f).log()  # the zeros count apart (log 1 = 0 in their place)
    log_cum = log_f.cumsum(-1) - log_f
    zeros_cum = zero.long().cumsum(-1) - zero.long()
    p_sorted = parent.gather(2, by_parent)
    first = torch.ones_like(zero)
    first[..., 1:] = p_sorted[..., 1:] != p_sorted[..., :-1]
    group_start = torch.where(first, torch.arange(n + 1, device=device), 0).cummax(-1).values
    excl = (log_cum - log_cum.gather(2, group_start)).exp() * (zeros_cum == zeros_cum.gather(2, group_start))
    edge = torch.empty_like(alpha).scatter_(2, by_parent, excl) * alpha  # weight of j in its parent
    log_all = torch.zeros_like(alpha).scatter_add_(2, parent, torch.where(1 - alpha == 0, 0.0, (1 - alpha).log()))
    zeros_all = torch.zeros_like(parent).scatter_add_(2, parent, (1 - alpha == 0).long())
    rho = log_all.exp() * (zeros_all == 0)  # roots' self-loops have α = 0 (factor 1)
    # (3) path products to the root
    weight, up = torch.where(parent == torch.arange(n + 1, device=device), 1.0, edge), parent
    while True:
        if bool((up.gather(2, up) == up).all()):
            break
        weight, up = weight * weight.gather(2, up), up.gather(2, up)
    contrib = (rho * weight)[..., :n, None].to(torch.float32) * values.float()
    out = torch.zeros(batch, heads, n + 1, values.shape[-1], dtype=torch.float32, device=device)
    out.scatter_add_(2, up[..., :n, None].expand(-1, -1, -1, values.shape[-1]), contrib)
    return out[..., :n, :]


@dataclass
class WeightedKV(Method):
    stage: str = "decode"
    sinks: int = 4

    name: ClassVar[str] = "weightedkv"
    merges: ClassVar[bool] = True
    query_aware: ClassVar[bool] = True
    cost: ClassVar[str] = "column sums of attention; merges values at eviction"
    reference: ClassVar[str] = "arXiv:2503.01330 (no official code)"
    adapts: ClassVar[bool] = False  # heads: ada does not apply: merges values at its cuts
    slot_state: ClassVar[tuple[str, ...]] = ("attn", "steps")

    def split(self, budget: int) -> tuple[int, int]:
        sinks = min(self.sinks, budget)
        return sinks, max(0, budget // 2 - sinks)

    def stats_request(self, phase: str) -> StatsRequest:
        return StatsRequest(colsum=True) if phase == "prefill" else StatsRequest(row=True)

    def _attended(self, layer, n_queries: int) -> torch.Tensor:
        """How many of the last n_queries queries see each cached token (causal)."""
        return (layer.seen - layer.view("pos")).clamp(max=n_queries).float()

    def average(self, layer) -> torch.Tensor:
        return layer.view("attn") / layer.view("steps")  # steps >= 1: every cached token was seen by a query

    def prefill_scores(self, layer, stats):
        layer.view("attn").add_(stats.colsum)
        layer.view("steps").add_(self._attended(layer, stats.n_queries))
        return self.average(layer)

    def decode_update(self, layer, stats) -> None:
        layer.view("attn").add_(stats.row)
        if stats.n_queries == 1:  # one new query sees every cached token
            layer.view("steps").add_(1)
        else:
            layer.view("steps").add_(self._attended(layer, stats.n_queries))

    def eviction_scores(self, layer):
        return self.average(layer)

    def before_evict(self, layer, victim, scores: torch.Tensor) -> None:
        """Merge the victim's value into the next token on its right (by position); `scores` hold ā (the
        victim's own is `victim.score`). One masked argmin over the positions finds the neighbour: the step
        is O(C) already (the victim is an argmin over C scores), and the scan costs fewer ops than keeping
        neighbour links (two pointer states, each fixed up at every write and eviction)."""
        pos = layer.view("pos")
        batch, heads = layer.index
        after = pos.masked_fill(pos.le(victim.pos[..., None]), torch.iinfo(torch.long).max)
        right = after.argmin(dim=-1)  # (B, H)
        values = layer.values
        v_r = values[batch, heads, right]  # (B, H, d)
        merged = merged_value(values[batch, heads, victim.slot], victim.score[..., 0], v_r, scores[batch, heads, right])
        if not layer.recent:  # no recent window: the victim may be the newest (nothing on its right)
            merged = torch.where(after.amin(dim=-1)[..., None] == torch.iinfo(torch.long).max, v_r, merged)
        values.index_put_((batch, heads, right), merged)

    def before_compact(self, layer, keep: torch.Tensor) -> None:
        """Apply the prompt's merges (slots are in position order at the prompt: a fresh cache)."""
        values = layer.values[:, :, : layer.length]
        values.copy_(replay_merges(values, self.average(layer), keep).to(values.dtype))
