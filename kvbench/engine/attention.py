"""The one attention function kvbench registers with transformers, and the attention statistics.

`install(model, base)` registers `kvbench_attention` under the name "kvbench" in
transformers' `AttentionInterface` and switches the model to it; nothing is
patched globally and no model class is touched. The function:

1. delegates the attention itself to the base implementation (`sdpa`, `eager`,
   `flash_attention_2`), with the causal layout of kvbench's cache: every cached
   token is visible, the new tokens are causal among themselves;
2. when the call carries a `kvbench_cache` (a `CompressedCache`), computes only
   the statistics the active method asks for and hands them to the cache, which
   compacts that layer right away. Column sums and a decode step's row come out
   of the same pass as the output (the base implementation is not called then).

Statistics never hold an n x n matrix: column sums over all queries are taken in
query blocks (O(block * n) memory), the window statistic is the same sum over
the last w queries (also in blocks), the decode row is one query. Query heads of a GQA group are averaged
so every statistic is per KV head: shape (batch, kv_heads, kv_len), float32.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvbench.engine.types import Stats, StatsRequest

NAME = "kvbench"
BASE_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
# A block of float32 attention logits holds about half as many bytes as one layer's K and V,
# between 16 MiB and 256 MiB: statistics never dominate the memory of a prefill.
MIN_BLOCK_ELEMENTS, MAX_BLOCK_ELEMENTS = 2**22, 2**26


def visible_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean (q_len, kv_len): query i (the i-th new token) sees every cached key and new keys up to itself."""
    offset = kv_len - q_len
    q_idx = torch.arange(q_len, device=device)[:, None]
    k_idx = torch.arange(kv_len, device=device)[None, :]
    return k_idx <= q_idx + offset


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain softmax(QK^T)V in float32 softmax; GQA by repeating KV heads; additive float mask."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask
    elif query.shape[2] > 1:
        causal = visible_mask(query.shape[2], key.shape[2], query.device)
        logits = logits.masked_fill(~causal, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _base_function(name: str):
    if name == "sdpa":
        return sdpa_attention_forward
    if name == "eager":
        return eager_attention
    if name == "flash_attention_2":
        from transformers.integrations.flash_attention import flash_attention_forward

        return flash_attention_forward
    raise ValueError(f"unknown base attention {name!r}; choose one of {BASE_IMPLEMENTATIONS}")


def kvbench_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, kvbench_cache=None, **kwargs
):
    ragged = kvbench_cache.layers[module.layer_idx].ragged if kvbench_cache is not None else None
    if ragged is not None:  # per-head budgets after the prompt: no statistics, decoded tokens appended
        return ragged.attention(query, query.shape[-1] ** -0.5 if scaling is None else scaling), None
    base = getattr(module.config, "kvbench_base_attention", "sdpa")
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = None
    if q_len > 1 and kv_len != q_len and base != "flash_attention_2":
        # new tokens after a (possibly compressed) cached prefix: bottom-right causal.
        # flash-attn aligns its causal mask bottom-right already.
        visible = visible_mask(q_len, kv_len, query.device)[None, None]
        if base == "sdpa":
            mask = visible
        else:
            mask = torch.zeros(visible.shape, dtype=query.dtype, device=query.device)
            mask = mask.masked_fill(~visible, torch.finfo(query.dtype).min)
    kwargs.pop("is_causal", None)
    request = kvbench_cache.stats_request(module.layer_idx, q_len) if kvbench_cache is not None else StatsRequest()
    if q_len == 1 and request.row and not request.colsum and not request.window:
        # a decode step whose method needs the attention row: one pass gives both output and row
        out, row = attention_with_row(query, key, value, scaling)
        stats = Stats(n_queries=1, row=row)
    elif (request.colsum or request.row) and not request.window:
        # column sums over every query (H2O, VATP, WeightedKV at the prompt): the same blocked pass
        # gives the output, so the prompt costs one attention pass, not the base's plus the statistics'
        colsum, out = attention_column_sums(query, key, scaling, value=value)
        stats = Stats(n_queries=q_len, colsum=colsum, row=colsum if request.row else None)
    else:
        out, _ = _base_function(base)(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
        stats = compute_stats(request, query, key, scaling) if request.any() else Stats(n_queries=q_len)
    if kvbench_cache is not None:
        kvbench_cache.after_attention(module.layer_idx, stats)
    return out, None


@contextmanager
def attention_function(model, name: str, function):
    """Run `model` with `function` registered as attention `name`, then restore its implementation.

    For probes that read attention as the model runs (head-score estimation, value-norm profiles)."""
    AttentionInterface.register(name, function)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def install(model, base: str = "sdpa") -> None:
    """Register kvbench's attention function and switch `model` to it, delegating to `base`."""
    if base not in BASE_IMPLEMENTATIONS:
        raise ValueError(f"unknown base attention {base!r}; choose one of {BASE_IMPLEMENTATIONS}")
    AttentionInterface.register(NAME, kvbench_attention)
    model.config.kvbench_base_attention = base
    model.set_attn_implementation(NAME)


# ----------------------------------------------------------------------------- statistics


def _grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, q, D) -> (B, Hkv, G, q, D); query head h belongs to KV head h // G (transformers' repeat_kv)."""
    b, hq, q, d = query.shape
    return query.view(b, kv_heads, hq // kv_heads, q, d)


def _probs(query_g, key, scaling, q_first, kv_len) -> torch.Tensor:
    """Softmax attention (float32) of a block of grouped queries on `key`, causal.

    `q_first` is the key index the block's first query sits at (it sees keys up to it).
    Works in place on one float32 buffer of the block's logits."""
    logits = torch.einsum("bhgqd,bhkd->bhgqk", query_g, key)
    logits = logits.float() if logits.dtype != torch.float32 else logits
    q_idx = torch.arange(q_first, q_first + query_g.shape[3], device=key.device)[:, None]
    k_idx = torch.arange(kv_len, device=key.device)[None, :]
    logits.mul_(scaling).masked_fill_(k_idx > q_idx, float("-inf"))
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=-1, keepdim=True))


def block_size(query, key) -> int:
    """Queries per block: a block of float32 logits holds about half the bytes of the layer's K and V,
    clamped to [MIN_BLOCK_ELEMENTS, MAX_BLOCK_ELEMENTS] elements."""
    layer_kv_bytes = 2 * key.numel() * key.element_size()
    elements = min(MAX_BLOCK_ELEMENTS, max(MIN_BLOCK_ELEMENTS, layer_kv_bytes // 8))  # fp32: half the bytes
    return max(1, elements // max(1, query.shape[0] * query.shape[1] * key.shape[2]))


def attention_column_sums(query, key, scaling=None, block: int | None = None, first: int = 0, value=None):
    """s_j = sum_i A_ij over the queries i >= `first` (causal), averaged over the query heads of a KV group.

    Computed in query blocks so memory is O(block * kv_len), never O(q_len * kv_len). With `value`, the
    same pass also gives the attention output, (B, q_len, Hq, D) as the base implementations return it:
    returns (sums, output), one attention pass instead of two.
    """
    b, hq, q_len, d = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    block = block or block_size(query, key)
    query_g = _grouped(query, kv_heads)
    out = torch.zeros(b, kv_heads, kv_len, dtype=torch.float32, device=key.device)
    offset = kv_len - q_len
    output = None if value is None else query.new_empty(query_g.shape[:3] + (q_len, value.shape[-1]))
    for start in range(first, q_len, block):
        stop = min(start + block, q_len)
        visible = offset + stop  # causal: this block sees no key past its last query
        probs = _probs(query_g[:, :, :, start:stop], key[:, :, :visible], scaling, start + offset, visible)
        out[:, :, :visible] += probs.sum(dim=3).mean(dim=2)
        if output is not None:
            weights = probs if value.dtype == torch.float32 else probs.to(value.dtype)
            output[:, :, :, start:stop] = torch.einsum("bhgqk,bhkd->bhgqd", weights, value[:, :, :visible])
    if output is None:
        return out
    return out, output.view(b, hq, q_len, -1).transpose(1, 2).contiguous()


def attention_window(query, key, window: int, scaling=None, block: int | None = None) -> torch.Tensor:
    """Mean attention of the last `window` queries on each key (group-averaged), in query blocks."""
    q_len = query.shape[2]
    w = min(window, q_len)
    return attention_column_sums(query, key, scaling, block, first=q_len - w).div_(w)


def attention_with_row(query, key, value, scaling=None):
    """Attention of one query per head, and its softmax row averaged over each KV group.

    Returns the output (B, 1, Hq, D) as the base implementations do, and the row (B, Hkv, kv_len) float32.
    """
    b, hq, _, d = query.shape
    kv_heads = key.shape[1]
    scaling = d**-0.5 if scaling is None else scaling
    query_g = _grouped(query, kv_heads)  # (B, Hkv, G, 1, D)
    logits = torch.einsum("bhgqd,bhkd->bhgqk", query_g, key).mul_(scaling)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights = probs if value.dtype == torch.float32 else probs.to(value.dtype)
    out = torch.einsum("bhgqk,bhkd->bhgqd", weights, value).reshape(b, 1, hq, d)  # q = 1: (B, Hq, 1) = (B, 1, Hq)
    return out, probs.mean(dim=(2, 3))


def compute_stats(request: StatsRequest, query, key, scaling=None) -> Stats:
    stats = Stats(n_queries=query.shape[2])
    if request.colsum or (request.row and query.shape[2] > 1):
        stats.colsum = attention_column_sums(query, key, scaling)
    if request.window:
        # per query head (`gqa: expand`): the KV heads repeated to every query head first, as repeat_kv does
        groups = query.shape[1] // key.shape[1] if request.per_query_head else 1
        window_keys = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        stats.window = attention_window(query, window_keys, request.window, scaling)
    if request.row:
        # a single decode query: its row is the column sum of one query
        stats.row = stats.colsum if query.shape[2] > 1 else attention_column_sums(query, key, scaling)
    return stats
