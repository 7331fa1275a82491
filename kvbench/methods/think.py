"""ThinK — Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv:2407.21018; reference code:
NVIDIA kvpress `ThinKPress` (kvpress/presses/think_press.py, commit 8bb29b9), reviewed there by ThinK's first
author.

A setting of any method (`method.key_channels=r`, kvpress's key_channel_compression_ratio): after the
prompt's cut, each KV head keeps its D - int(D r) key channels of highest

    score_c = mean_{i in the last w prompt queries} q_ic^2  (then the mean over the GQA group)
              x mean_{j in the kept tokens} k_jc^2                (queries and keys after RoPE)

and the attention reads the pruned channels as zero, as kvpress zeroes them. Unlike kvpress (which zeroes and
keeps the full tensor: no memory saved), kvbench stores only the kept channels of the prompt's keys
(`kvbench.engine.channels`); decoded tokens keep every channel (kvpress prunes the prompt only). Carried over:
the window of 32 queries, the squared means, the group mean of the query term, int() of the pruned count,
the prune after the token method (kvpress's ComposedPress([SnapKVPress(), ThinKPress()]) order). Differs:
float32 scores; ties in `topk` as torch gives them (kvpress: the same call).
"""

from __future__ import annotations

import torch


def kept_channels(queries: torch.Tensor, keys: torch.Tensor, ratio: float) -> torch.Tensor:
    """Channels each KV head keeps (B, Hkv, D - int(D ratio)) long, from the window queries (B, Hq, w, D) and
    the kept keys (B, Hkv, n, D), both after RoPE."""
    batch, kv_heads, _, dim = keys.shape
    q = queries.float().pow(2).mean(dim=2)
    q = q.view(batch, kv_heads, q.shape[1] // kv_heads, dim).mean(dim=2)
    score = q * keys.float().pow(2).mean(dim=2)
    return score.topk(dim - int(dim * ratio), dim=-1).indices


def kept_segment_channels(queries: torch.Tensor, keys: torch.Tensor, lens: torch.Tensor, ratio: float) -> torch.Tensor:
    """The same choice on a ragged store (per-head budgets): channels each segment keeps (S, D - int(D ratio)),
    from the window queries (B, Hq, w, D), the packed kept keys (N, D) and the segment lengths (B, H) (H: the
    KV heads, or the query heads of a `gqa: expand` store)."""
    batch, heads = lens.shape
    dim = keys.shape[-1]
    q = queries.float().pow(2).mean(dim=2)
    q = q.view(batch, heads, q.shape[1] // heads, dim).mean(dim=2).reshape(batch * heads, dim)
    segment = torch.repeat_interleave(torch.arange(batch * heads, device=keys.device), lens.flatten(),
                                      output_size=keys.shape[0])
    k = keys.new_zeros(batch * heads, dim, dtype=torch.float32).index_add_(0, segment, keys.float().pow(2))
    k = k / lens.flatten().clamp(min=1)[:, None]
    return (q * k).topk(dim - int(dim * ratio), dim=-1).indices
