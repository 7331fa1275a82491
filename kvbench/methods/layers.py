"""Per-layer budgets that any scorer can take (`method.layers`): PyramidKV's schedule (Cai et al.,
arXiv:2406.02069, as KVCache-Factory computes it; `kvbench.methods.pyramidkv` states the formula).

With `layers: pyramid`, a layer keeps its protected tokens (sinks, recent window) and
pyramid_cap(l, layers, C - protected, L - protected, pyramid_beta) more, so lower layers keep more and the
mean over the layers is C (the cache's budget). Layers with a sliding window keep at most their window.
"""

from __future__ import annotations


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
