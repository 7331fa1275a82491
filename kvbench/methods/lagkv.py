"""LagKV — Liang et al., "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are
Important", arXiv:2504.04704; reference code: NVIDIA kvpress `LagKVPress`.

The prompt after `n_sink` sinks is cut into partitions of `lag_size` tokens; each partition is scored
against the next one (its "lag"), channel by channel, without attention:

    for a partition P and the next one R, per KV head, for X in (keys, values):
        x'_j   = (x_j - min_R x) / (max_R x - min_R x)        (per channel, min / max over R's tokens)
        sx_j   = softmax over P's tokens of std over channels of x'_j
    s_j  = (sk_j + sv_j) / 2, then (cross_scoring false) replaced by its rank inside P / lag_size
    the sinks and the tail (the last partition and the rest, which have no lag) score 1: always kept first

A prompt shorter than `n_sink + 2 * lag_size` is not partitioned: sinks score 1, the rest rise with
position (the recent ones are kept). As kvpress: computed in the keys' dtype, keys after RoPE, ties left to
the top-k (kvbench: the more recent token wins). Query-agnostic, prompt only (`stage: prefill`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import KVBenchError
from kvbench.methods.base import Method


def lag_scores(parts: torch.Tensor, lag_size: int) -> torch.Tensor:
    """parts (B, H, P, lag, D) -> scores (B, H, P-1, lag): each partition against the next."""
    ref, target = parts[:, :, 1:], parts[:, :, :-1]
    low = ref.min(dim=-2).values.unsqueeze(-2).expand(-1, -1, -1, lag_size, -1)
    high = ref.max(dim=-2).values.unsqueeze(-2).expand(-1, -1, -1, lag_size, -1)
    return ((target - low) / (high - low)).std(dim=-1).softmax(dim=-1)


@dataclass
class LagKV(Method):
    n_sink: int = 4
    lag_size: int = 128
    cross_scoring: bool = False  # true: the raw scores (comparable across partitions and heads), not ranks

    name: ClassVar[str] = "lagkv"
    stages: ClassVar[tuple[str, ...]] = ("prefill",)  # partitions need the next one as reference
    query_aware: ClassVar[bool] = False
    cost: ClassVar[str] = "key/value min-max spreads per partition (no attention)"
    reference: ClassVar[str] = "arXiv:2504.04704; kvpress LagKVPress"

    def __post_init__(self):
        super().__post_init__()
        if self.n_sink < 0 or self.lag_size < 1:
            raise KVBenchError("method.n_sink must be >= 0 and method.lag_size >= 1")

    def prefill_scores(self, layer, stats):
        keys, values = layer.view("keys"), layer.view("values")
        batch, heads, n, dim = keys.shape
        if n < self.n_sink + 2 * self.lag_size:
            score = torch.ones(batch, heads, n, dtype=keys.dtype, device=keys.device)
            if n > self.n_sink:
                score[:, :, self.n_sink :] = (torch.arange(n - self.n_sink, device=keys.device)
                                              / (n - self.n_sink)).to(keys.dtype)
            return score
        end = self.n_sink + ((n - self.n_sink) // self.lag_size) * self.lag_size
        shape = (batch, heads, -1, self.lag_size, dim)
        score = (lag_scores(keys[:, :, self.n_sink : end].reshape(shape), self.lag_size)
                 + lag_scores(values[:, :, self.n_sink : end].reshape(shape), self.lag_size)) / 2
        if not self.cross_scoring:
            score = (score.argsort(dim=-1).argsort(dim=-1) / self.lag_size).to(keys.dtype)
        ones = lambda count: torch.ones(batch, heads, count, dtype=score.dtype, device=score.device)  # noqa: E731
        return torch.cat((ones(self.n_sink), score.reshape(batch, heads, -1), ones(self.lag_size + n - end)), dim=-1)
