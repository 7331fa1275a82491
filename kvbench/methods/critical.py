"""CriticalKV — Feng et al., "Identify Critical KV Cache in LLM Inference from an Output Perturbation
Perspective", arXiv:2502.03805; reference code: NVIDIA kvpress `CriticalKVPress` and `CriticalAdaKVPress`
(kvpress/presses/criticalkv_press.py, commit 8bb29b9).

A re-ranking that composes with any scorer (`method.critical: true`): a token's effect on the layer's
output is its attention times the size of its value after the output projection, so half of each head's
budget goes by the method's own score, the rest by that score weighted by ||W_o v||_1:

    n_h    = the tokens head h keeps (C; with `heads: ada` its Ada-KV budget)
    stage1 = head h's top int(n_h x critical_ratio) tokens by the method's score s      (critical_ratio = 0.5)
    w_j    = mean over the query heads g of KV head h of || v_j W_o[g] ||_1            (W_o[g]: (head_dim, hidden))
    keep   = stage1 ∪ the top n_h - |stage1| other tokens by (s_j + critical_epsilon) x w_j

Carried over from kvpress: the L1 norm over the hidden size of each query head's block of o_proj applied to
the values, one query head at a time (no (heads, tokens, hidden) tensor), averaged over the GQA group, in
the values' dtype; epsilon 1e-4; first-stage share 0.5 and int() rounding; with Ada-KV (CriticalAdaKV) the
head budgets come from the method's scores first, each head's top int(C x ada_floor) tokens safe (they are
among the top scores, so they are kept), then both stages inside each head's budget. Protected tokens
(sinks, SnapKV's window, ExpectedAttention's sinks: what kvpress scores at the maximum) rank first in
stage 1.

Differences: kvpress's dense first stage counts int((1 - ratio) x L x 0.5) tokens and kvbench int(C x 0.5),
equal but for one token of rounding when C = int((1 - ratio) x L); the weighted score is float32 (kvpress:
the scores' dtype); ties keep the more recent token (kvpress: `topk` order). Prompt only (stage prefill).
"""

from __future__ import annotations

import torch

from kvbench.engine.ranking import select_per_head
from kvbench.errors import KVBenchError


def value_output_norms(values: torch.Tensor, out_proj: torch.Tensor) -> torch.Tensor:
    """w (batch, kv_heads, n) float32: ||v_j W_o[g]||_1 averaged over the query heads g of each KV head, from
    values (batch, kv_heads, n, head_dim) and the o_proj weight (hidden, query_heads x head_dim)."""
    batch, kv_heads, n, head_dim = values.shape
    query_heads = out_proj.shape[1] // head_dim
    groups = query_heads // kv_heads
    blocks = out_proj.to(values.dtype).t().reshape(query_heads, head_dim, out_proj.shape[0])
    norms = torch.stack([values[:, g // groups].matmul(blocks[g]).norm(p=1, dim=-1) for g in range(query_heads)],
                        dim=1)
    return norms.view(batch, kv_heads, groups, n).mean(dim=2).float()


def critical_scores(scores: torch.Tensor, values: torch.Tensor, out_proj: torch.Tensor, budgets: torch.Tensor,
                    ratio: float, epsilon: float, safe: int = 0) -> torch.Tensor:
    """The scores the cut ranks by (batch, heads, n) float32: +inf for the first stage (and for tokens that
    already score +inf: protected), (s + epsilon) x w for the others. `budgets` (batch, heads): tokens each
    head keeps; `safe`: Ada-KV's guaranteed top tokens per head (kept by both stages in kvpress)."""
    if out_proj is None:
        raise KVBenchError("method.critical needs the layer's output projection: the engine did not give it")
    counts = (budgets * ratio).long().clamp(min=safe)
    stage1 = select_per_head(scores, counts) | torch.isposinf(scores)
    weighted = (scores.float() + epsilon) * value_output_norms(values, out_proj)
    return weighted.masked_fill(stage1, float("inf"))
