"""Expected Attention — Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from
Future Queries Distribution", arXiv:2510.00636; reference code: NVIDIA kvpress `ExpectedAttentionPress`
(kvpress/presses/expected_attention_press.py).

Score each cached token by the attention that future queries are expected to pay it, per query head, from
the statistics of the prompt's queries before RoPE (kvpress's `get_prerope_query_states`):

    mu, S  = mean and covariance of the queries before RoPE at positions >= n_sink   (S: divided by the count)
    R      = mean over t in [L, L + n_future_positions) of the RoPE rotation at position t   (L: the prompt length)
    mu', S' = R mu, R S R^T
    z_j    = k_j . mu' / sqrt(d) + k_j^T S' k_j / (2 d)     (use_covariance false: the first term only)
    a_j    = softmax over the non-sink tokens j of z_j, then the mean over the query heads of a KV group
    s_j    = (a_j + epsilon) * ||v_j||_2                    (use_vnorm false: s_j = a_j)
    the n_sink first positions score max(s) + 1: always kept;  keep = top C by s

Rules carried over from kvpress: keys as the cache stores them (after RoPE), d the head dimension (not the
layer's own scaling), the rotation R built from the model's own RoPE tables (its attention scaling
included), a biased covariance, the softmax over the non-sink keys, the group mean after the softmax, no
recent window, every step in the queries' dtype (kvpress: the model's dtype), `epsilon` used only with
`use_vnorm`. Ties: kvpress leaves them to `torch.topk`; kvbench keeps the more recent token.

Where kvbench differs, by construction rather than by a switch:
- the queries before RoPE are the attention call's queries with RoPE undone in float32 (kvbench.engine.attention
  `prerope_queries`), not the projection recomputed from the hidden states: equal up to the queries' rounding;
- the sinks are the tokens at positions < n_sink (kvpress: the first n_sink keys of the layer): the same on a
  full-attention layer; on a sliding layer, cut to its window before scoring, no sink is left in it;
- with `positions: shifted` the future positions still start at L (the prompt's length), as the prompt was
  rotated at its original positions.
Prompt only (`stage: prefill`), as kvpress's press; query-aware: the question's queries enter mu and S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.types import StatsRequest
from kvbench.errors import KVBenchError
from kvbench.methods.base import Method


def average_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R = mean_t (I diag(cos_t) + P diag(sin_t)), (D, D), from the RoPE tables (n, D) (kvpress `apply_avg_rope`):
    R x = mean_t (x cos_t + rotate_half(x) sin_t). I and P hold 0 and +-1 only, so the mean of the n matrices
    kvpress builds is I diag(mean cos) + P diag(mean sin), the same numbers without the (n, D, D) tensor."""
    dim = cos.shape[-1]
    half = dim // 2
    eye = torch.eye(dim, dtype=cos.dtype, device=cos.device)
    swap = torch.zeros(dim, dim, dtype=cos.dtype, device=cos.device)
    swap[half:, :half], swap[:half, half:] = torch.eye(half), -torch.eye(half)
    return eye * cos.mean(dim=0) + swap * sin.mean(dim=0)


@dataclass
class ExpectedAttention(Method):
    n_future_positions: int = 512  # future positions the RoPE rotation is averaged over
    n_sink: int = 4  # the first n_sink positions: left out of the query statistics and of the softmax, always kept
    use_covariance: bool = True  # add the covariance term k^T S k / (2 d) to the expected logit
    use_vnorm: bool = True  # weight the expected attention by the value norm: (a + epsilon) * ||v||
    epsilon: float = 0.0

    name: ClassVar[str] = "expected_attention"
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    query_aware: ClassVar[bool] = True
    cost: ClassVar[str] = "mean and covariance (D x D per query head) of the prompt's queries before RoPE; no attention"
    reference: ClassVar[str] = "arXiv:2510.00636; kvpress ExpectedAttentionPress"

    def __post_init__(self):
        super().__post_init__()
        if self.n_future_positions < 1 or self.n_sink < 0 or self.epsilon < 0:
            raise KVBenchError("method.n_future_positions must be >= 1, method.n_sink >= 0 and method.epsilon >= 0")

    def stats_request(self, phase: str) -> StatsRequest:
        return StatsRequest(queries=True)

    def query_statistics(self, queries: torch.Tensor, rope, prompt_len: int):
        """mu' (B, Hq, D) and S' (B, Hq, D, D) (None without covariance): the moments of the queries at
        positions >= n_sink, rotated by the RoPE averaged over the next n_future_positions positions."""
        states = queries[:, :, self.n_sink :]
        mu = states.mean(dim=2, keepdim=True)
        cov = None
        if self.use_covariance:
            centered = states - mu
            cov = torch.einsum("bnsi,bnsj->bnij", centered, centered) / states.shape[2]
        mu = mu.squeeze(2)
        cos, sin = rope(torch.arange(prompt_len, prompt_len + self.n_future_positions, device=queries.device))
        rotation = average_rotation(cos.to(queries.dtype), sin.to(queries.dtype))
        mu = torch.matmul(mu, rotation.T)
        if cov is not None:
            cov = torch.matmul(rotation, torch.matmul(cov, rotation.T))
        return mu, cov

    def prefill_scores(self, layer, stats):
        keys, values, pos = layer.view("keys"), layer.view("values"), layer.view("pos")
        batch, kv_heads, n, dim = keys.shape
        sink = pos < self.n_sink
        if stats.queries.shape[2] <= self.n_sink or bool(sink.all()):  # nothing to estimate: keep the newest
            return pos.to(keys.dtype)
        mu, cov = self.query_statistics(stats.queries, stats.rope, layer.seen)
        groups = mu.shape[1] // kv_heads
        keys_t = keys.repeat_interleave(groups, dim=1).transpose(2, 3)  # (B, Hq, D, n), as repeat_kv
        logits = torch.matmul(mu.unsqueeze(2), keys_t).squeeze(2) / math.sqrt(dim)
        if cov is not None:
            logits = logits + torch.einsum("bhin,bhij,bhjn->bhn", keys_t, cov, keys_t) / dim / 2
        logits = logits.masked_fill(sink.repeat_interleave(groups, dim=1), float("-inf"))
        scores = logits.softmax(dim=-1).view(batch, kv_heads, groups, n).mean(dim=2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values.norm(dim=-1)
        top = scores.masked_fill(sink, float("-inf")).max()
        return torch.where(sink, top + 1, scores)
