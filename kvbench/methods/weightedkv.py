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
  never changes any ā, so the kept set is the top C by ā; the merges are
  replayed in eviction order (lowest ā first) over a linked list of the alive
  positions, one vectorised step per evicted token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.attention import StatsRequest
from kvbench.methods.base import Method


def merged_value(v_j: torch.Tensor, abar_j: torch.Tensor, v_r: torch.Tensor, abar_r: torch.Tensor) -> torch.Tensor:
    """(ā_j v_j + ā_r v_r) / (ā_j + ā_r), or v_r where ā_j + ā_r = 0. ā broadcast over head_dim."""
    total = abar_j + abar_r
    safe = torch.where(total > 0, total, torch.ones_like(total))
    merged = (abar_j[..., None] * v_j.float() + abar_r[..., None] * v_r.float()) / safe[..., None]
    return torch.where((total > 0)[..., None], merged, v_r.float()).to(v_r.dtype)


def merge_into_right(values, j, r, abar_j, abar_r, has_right) -> None:
    """In place: v_r <- merged_value(v_j, ā_j, v_r, ā_r) per (batch, head); v_r unchanged without a right neighbour."""
    index = r[..., None, None].expand(-1, -1, 1, values.shape[-1])
    v_j = values.gather(2, j[..., None, None].expand_as(index))[:, :, 0]
    v_r = values.gather(2, index)[:, :, 0]
    merged = torch.where(has_right[..., None], merged_value(v_j, abar_j, v_r, abar_r), v_r)
    values.scatter_(2, index, merged[:, :, None])


@dataclass
class WeightedKV(Method):
    stage: str = "decode"
    sinks: int = 4

    name: ClassVar[str] = "weightedkv"
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
        return layer.view("attn") / layer.view("steps").clamp(min=1)

    def prefill_scores(self, layer, stats):
        layer.view("attn").add_(stats.colsum)
        layer.view("steps").add_(self._attended(layer, stats.n_queries))
        return self.average(layer)

    def decode_update(self, layer, stats) -> None:
        layer.view("attn").add_(stats.row)
        layer.view("steps").add_(self._attended(layer, stats.n_queries))

    def eviction_scores(self, layer):
        return self.average(layer)

    def before_evict(self, layer, victim: torch.Tensor) -> None:
        pos = layer.view("pos")
        victim_pos = pos.gather(2, victim[..., None])
        right = pos.masked_fill(pos <= victim_pos, torch.iinfo(torch.long).max)
        r = right.argmin(dim=-1)  # the next token to the right
        has_right = right.gather(2, r[..., None])[..., 0] != torch.iinfo(torch.long).max
        abar = self.average(layer)
        a_j, a_r = abar.gather(2, victim[..., None])[..., 0], abar.gather(2, r[..., None])[..., 0]
        merge_into_right(layer.values, victim, r, a_j, a_r, has_right)

    def before_compact(self, layer, keep: torch.Tensor) -> None:
        """Replay the prompt's merges: evicted tokens in ascending ā (then position), each into its
        alive right neighbour. Slots are in position order at the prompt (a fresh cache)."""
        n = layer.length
        batch, heads = keep.shape[:2]
        device = keep.device
        abar = self.average(layer)
        evicted = torch.ones(batch, heads, n, dtype=torch.bool, device=device)
        evicted.scatter_(2, keep, False)
        # eviction order: lowest ā first, ties by position (stable sort over a position-ordered axis)
        order = abar.masked_fill(~evicted, float("inf")).sort(dim=-1, stable=True).indices[..., : n - keep.shape[-1]]
        # doubly linked list over slots 1..n, with sentinels 0 (before the first) and n + 1 (after the last)
        slots = torch.arange(n + 2, device=device).expand(batch, heads, -1)
        nxt, prv = (slots + 1).clone(), (slots - 1).clone()
        values = layer.values[:, :, :n]
        for step in range(order.shape[-1]):
            j = order[..., step]  # (B, H), a slot 0..n-1
            node = j + 1
            r_node = nxt.gather(2, node[..., None])[..., 0]
            p_node = prv.gather(2, node[..., None])[..., 0]
            has_right = r_node <= n
            r = (r_node - 1).clamp(max=n - 1)
            a_j, a_r = abar.gather(2, j[..., None])[..., 0], abar.gather(2, r[..., None])[..., 0]
            merge_into_right(values, j, r, a_j, a_r, has_right)
            nxt.scatter_(2, p_node[..., None], r_node[..., None])
            prv.scatter_(2, r_node[..., None], p_node[..., None])
