"""The per-head top-k of the prompt cut with kvbench's tie rule (the more recent token wins), on scores alone:
the engine's per-head cut uses it, and so may a method that ranks in stages (CriticalKV)."""

from __future__ import annotations

import torch


def select_per_head(scores: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Boolean keep mask (batch, heads, n): the top `budgets[b, h]` scores of each head, the more recent
    token winning ties. Slots must be in position order (a fresh cache at the prompt)."""
    newest_first = scores.float().flip(-1)
    order = newest_first.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (ranks < budgets[..., None]).flip(-1)
