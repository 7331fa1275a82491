"""Per-layer budgets that any scorer can take (`method.layers`): PyramidKV's schedule (Cai et al.,
arXiv:2406.02069, as KVCache-Factory computes it; `kvbench.methods.pyramidkv` states the formula), and CAKE's
layer preferences with its cascade (Qin et al., arXiv:2503.12491; antgroup/cakekv c4675ce, whose arithmetic
`kvbench.methods.cake` states and shares from here: `preference`, `adjust_budgets`, `cake_budgets`).

With `layers: pyramid`, a layer keeps its protected tokens (sinks, recent window) and
pyramid_cap(l, layers, C - protected, L - protected, pyramid_beta) more, so lower layers keep more and the
mean over the layers is C (the cache's budget). Layers with a sliding window keep at most their window.

With `layers: cake`, at each layer's prompt cut its preference pref_l = H_l^(1/tau1) x V_l^(1/tau2) comes from
the softmax rows of the last `cake_window` queries (`preference`), and the layers so far share the model's
total (C - protected) x layers by preference (`cake_budgets`: at most L - protected each); every layer keeps
its protected tokens and its share. Earlier layers given less than they hold are cut again (the cascade), ranked
by the scores the method gave them at their own cut: `keep_cut_scores` keeps those by position in
`layer.notes` (a (batch, heads, L) table per layer in the method's dtype, held until the last layer's cut),
`cut_scores_now` reads them for the slots a layer holds. A layer ends at the smallest budget it was given, so
it keeps the method's own top-k there (top-k cuts of one ranking are nested).
"""

from __future__ import annotations

import torch


def pyramid_cap(layer_idx: int, num_layers: int, per_head: int, prefix: int, beta: int) -> int:
    """Tokens per head in layer `layer_idx` (beyond the protected ones) on PyramidKV's schedule, for a mean
    of `per_head` over the layers and `prefix` tokens to choose from; see `kvbench.methods.pyramidkv`."""
    if num_layers == 1:
        return per_head
    lo = per_head // beta
    hi = 2 * per_head - lo
    if hi >= prefix:
        hi = prefix
        lo = 2 * per_head - hi
    step = (hi - lo) // (num_layers - 1)
    return hi - layer_idx * step


def adjust_budgets(budgets: list[float], total: int, cap: int) -> list[int]:
    """CAKE's `adjust_budgets` (cake/utils.py): truncate to int, cap each at `cap` and give the excess evenly to
    the layers under the cap (the remainder one each, first layers first), then make the sum `total` the same
    way (adding to layers under the cap, or taking from layers above 1)."""
    out = [int(b) for b in budgets]
    excess = sum(max(b - cap, 0) for b in out)
    out = [min(b, cap) for b in out]
    if excess > 0:
        _spread(out, excess, [i for i, b in enumerate(out) if b < cap])
    diff = total - sum(out)
    if diff > 0:
        _spread(out, diff, [i for i, b in enumerate(out) if b < cap])
    elif diff < 0:
        _spread(out, diff, [i for i, b in enumerate(out) if b > 1])
    return out


def _spread(out: list[int], amount: int, layers: list[int]) -> None:
    """Add `amount` (or take it, when negative) evenly over `layers`, the remainder one each to the first."""
    if not layers:
        return
    sign = 1 if amount > 0 else -1
    each, remainder = divmod(abs(amount), len(layers))
    for rank, i in enumerate(layers):
        out[i] += sign * (each + (rank < remainder))


def preference(probs: torch.Tensor, tau1: float, tau2: float) -> float:
    """CAKE's pref = H^(1/tau1) x V^(1/tau2) from the window rows (batch, heads, w, n): the entropy and the
    summed unbiased variance over the window queries, of the attention on the n - w prefix keys."""
    prefix = probs[..., : probs.shape[-1] - probs.shape[2]]
    if prefix.shape[-1] == 0:  # no key before the window (a sliding layer's window no longer than w)
        return 0.0
    dispersion = -(prefix * torch.log(prefix + 1e-10)).sum()
    return (dispersion ** (1 / tau1) * prefix.var(dim=2).sum() ** (1 / tau2)).item()


def cake_budgets(prefs: list[float], total: int, cap: int) -> list[int]:
    """CAKE's layer budgets beyond the protected tokens: `total` shared in proportion to the layers'
    preferences (evenly if they are all 0), then `adjust_budgets` (int, at most `cap` each, summing to `total`
    where the caps allow)."""
    shares = [p / sum(prefs) * total for p in prefs] if sum(prefs) > 0 else [total / len(prefs)] * len(prefs)
    return adjust_budgets(shares, total, cap)


def cake_allocations(layers: list, probs: torch.Tensor, allocation: tuple[int, int, int], num_layers: int,
                     tau1: float, tau2: float) -> list[tuple[int, int, int]]:
    """`layers: cake` at the prompt cut of `layers[-1]` (`probs`: its window rows): its preference, stored in its
    notes, then every layer so far gets (its CAKE budget + protected, sinks, recent) of the model's total."""
    budget, sinks, recent = allocation
    protected = sinks + recent
    layers[-1].notes["preference"] = preference(probs, tau1, tau2)
    budgets = cake_budgets([layer.notes["preference"] for layer in layers], (budget - protected) * num_layers,
                           layers[-1].seen - protected)
    final = len(layers) == num_layers  # no later cut: a layer cut again now drops its scores, the others at once
    for layer, kept in zip(layers[:-1], budgets):
        if final and kept + protected < layer.length:
            layer.notes["cut_scores_last"] = True
        elif final:
            layer.notes.pop("cut_scores", None)
    return [(kept + protected, sinks, recent) for kept in budgets]


def keep_cut_scores(layer, scores: torch.Tensor | None) -> None:
    """Keep the scores (batch, heads, length) a method gives `layer` at its cut, by position, in its notes
    (None: the method keeps the most recent, so do the cuts after it)."""
    if scores is None:
        return
    pos = layer.view("pos")
    first = int(pos.min())  # a sliding layer holds its window's positions only
    table = torch.full((*scores.shape[:2], layer.seen - first), float("-inf"), dtype=scores.dtype,
                       device=scores.device)
    layer.notes["cut_scores"] = (first, table.scatter_(-1, pos - first, scores))


def cut_scores_now(layer) -> torch.Tensor | None:
    """The scores `keep_cut_scores` kept for the tokens `layer` holds now (None: none kept, rank by recency);
    dropped after the last cut that needs them."""
    if "cut_scores" not in layer.notes:
        return None
    first, table = layer.notes["cut_scores"]
    if layer.notes.pop("cut_scores_last", False):
        del layer.notes["cut_scores"]
    return table.gather(-1, layer.view("pos") - first)
