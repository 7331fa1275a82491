"""The selection rules every method shares: what a prompt cut keeps, and which token a decode step evicts.

Stated on positions, never on slot order; among equal scores the more recent token is kept.
"""

from __future__ import annotations

import torch

from kvbench.engine.types import LayerView, Victim


def select(layer: LayerView, scores: torch.Tensor | None, budget: int, sinks: int, recent: int, chunk: int = 0):
    """Slots to keep (batch, heads, budget): the protected sinks and recent window, then the top scores
    (the most recent when a method has no scores); among equal scores the more recent token wins.
    Protection is a mask on a float32 copy of the scores, never a large number added to them.
    `chunk` > 0 (ChunkKV): each token ranks by its chunk's score (`chunk_rank`)."""
    protected = layer.protected(sinks, recent)
    if chunk and scores is not None:
        rank = chunk_rank(scores, layer.view("pos"), chunk, protected)
    else:
        rank = (scores if scores is not None else layer.view("pos")).float()
    rank = rank.masked_fill(protected, float("inf"))
    newest_first = layer.view("pos").argsort(dim=-1, descending=True)
    best = rank.gather(-1, newest_first).sort(dim=-1, descending=True, stable=True).indices[..., :budget]
    return newest_first.gather(-1, best)


def chunk_rank(scores: torch.Tensor, pos: torch.Tensor, chunk: int, protected: torch.Tensor) -> torch.Tensor:
    """ChunkKV (arXiv:2502.00299; kvpress ChunkKVPress): every token ranked (batch, heads, n) float32 by the
    score of its chunk, the same in every head, so a top-C cut keeps whole chunks (then the newest tokens of
    the next chunk, by the tie rule). Chunks are `chunk` consecutive positions counted from 0 (the last one
    may be partial); a chunk's score is its tokens' scores summed over the heads, then averaged over the
    chunk's tokens (a partial chunk over its own), both rounded to the scores' dtype as kvpress computes
    them. A chunk holding a protected token ranks above every other (float32 max; its protected tokens
    themselves first: inf in `select`). Fewer tokens than `chunk` (no complete chunk): the plain scores, as
    kvpress falls back to the wrapped press. Stated on positions (a fresh cache at the prompt cut: every
    head holds the same tokens)."""
    batch, heads, n = scores.shape
    if n < chunk:
        return scores.float()
    ids = pos[:, 0] // chunk
    ids = ids - ids.amin(dim=-1, keepdim=True)  # a sliding layer's window starts past position 0
    chunks = int(ids.max()) + 1
    summed = scores.sum(dim=1).float()  # over heads, in the scores' dtype (kvpress: scores.sum(dim=1))
    total = summed.new_zeros(batch, chunks).scatter_add_(1, ids, summed)
    count = summed.new_zeros(batch, chunks).scatter_add_(1, ids, torch.ones_like(summed))
    mean = (total / count.clamp(min=1)).to(scores.dtype).float()
    held = summed.new_zeros(batch, chunks).scatter_add_(1, ids, protected.any(dim=1).float()) > 0
    mean = mean.masked_fill(held, torch.finfo(torch.float32).max)
    return mean.gather(1, ids)[:, None].expand(batch, heads, n)


def oldest(layer: LayerView, sinks: int) -> torch.Tensor:
    """The slot (batch, heads) of the oldest token after the sinks: recency eviction. (With more tokens
    than the budget, the recent window never covers every non-sink token, so this one is unprotected.)"""
    pos = layer.view("pos")
    return (pos.masked_fill(pos < sinks, torch.iinfo(torch.long).max) if sinks else pos).argmin(dim=-1)


def lowest(layer: LayerView, scores: torch.Tensor, sinks: int, recent: int) -> Victim:
    """The slot (batch, heads) with the lowest score outside the protected tokens; among equal scores the
    older token goes (the newer wins, as at the prompt cut), whatever the slot order. With its position
    and its score (float32), which the same reductions give."""
    ranked = scores if scores.dtype == torch.float32 else scores.float()
    pos = layer.view("pos")
    if sinks or recent:
        ranked = ranked.masked_fill(layer.protected(sinks, recent, pos), float("inf"))
    score = ranked.amin(dim=-1, keepdim=True)
    oldest_pos, slot = pos.masked_fill(ranked.ne(score), torch.iinfo(torch.long).max).min(dim=-1)
    return Victim(slot, oldest_pos, score)
