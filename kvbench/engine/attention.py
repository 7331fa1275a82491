"""The one attention function kvbench registers with transformers, and the attention statistics.

`install(model, base)` registers `kvbench_attention` under the name "kvbench" in
transformers' `AttentionInterface` and switches the model to it; nothing is
patched globally and no model class is touched. The function:

1. runs the layer's own attention (`LayerAttention`: the scaling the module
   passes, a sliding window, logit softcapping, attention sinks) on kvbench's
   cache: every cached token the layer's mask allows is visible, the new tokens
   are causal among themselves. It delegates to the base implementation (`sdpa`,
   `eager`, `flash_attention_2`) where that can run the layer, and computes the
   attention itself (exact, in query blocks) where it cannot: softcapping or
   sinks under sdpa/eager, sinks or a sliding window over a compressed layer's
   slots under flash-attn 2;
2. when the call carries a `kvbench_cache` (a `CompressedCache`), computes only
   the statistics the active method asks for, with the same semantics, and hands
   them to the cache, which compacts that layer right away. Column sums and a
   decode step's row come out of the same pass as the output.

Statistics never hold an n x n matrix: column sums over all queries are taken in
query blocks (O(block * n) memory), the window statistic is the same sum over
the last w queries (also in blocks), the decode row is one query. Query heads of a GQA group are averaged
so every statistic is per KV head: shape (batch, kv_heads, kv_len), float32. A sink takes probability
mass from every query but is never a cache token: it appears in no statistic.
"""

from __future__ import annotations

import contextlib
import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvbench.engine.architecture import check_supported
from kvbench.engine.types import Stats, StatsRequest
from kvbench.errors import KVBenchError

NAME = "kvbench"
BASE_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
# A block of float32 attention logits holds about half as many bytes as one layer's K and V,
# between 16 MiB and 256 MiB: statistics never dominate the memory of a prefill.
MIN_BLOCK_ELEMENTS, MAX_BLOCK_ELEMENTS = 2**22, 2**26


@dataclass(frozen=True)
class LayerAttention:
    """How one layer turns query-key logits into probabilities, as its module passes them to the attention
    function: logits = q.k * scaling, then softcap * tanh(logits / softcap) when softcapped; a query at
    position p sees the keys at positions p - window < pos <= p (every earlier key without a window);
    `sinks` (query_heads,) are per-head logits that join each softmax and take mass (gpt-oss `s_aux`)."""

    scaling: float
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    @classmethod
    def of(cls, spec, head_dim: int) -> LayerAttention:
        """From a LayerAttention, a scaling factor, or None (head_dim ** -0.5)."""
        if isinstance(spec, LayerAttention):
            return spec
        return cls(head_dim**-0.5 if spec is None else spec)

    @property
    def plain(self) -> bool:
        """Softmax of scaled logits: what every base implementation computes."""
        return self.softcap is None and self.sinks is None


def hidden(q_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """True where a query cannot see a key: a later key, or one the window left behind.

    q_pos (q,); key_pos (k,) -> (q, k), or per head (B, H, k) -> (B, H, q, k)."""
    keys = key_pos[..., None, :]
    queries = q_pos[:, None]
    out = keys > queries
    if window:
        out |= keys <= queries - window
    return out


def visible_mask(q_len: int, kv_len: int, device, window: int | None = None) -> torch.Tensor:
    """Boolean (q_len, kv_len): query i (the i-th of the newest q_len tokens, the keys in position order)
    sees every earlier key (within `window`) and itself."""
    offset = kv_len - q_len
    q_pos = torch.arange(offset, kv_len, device=device)
    return ~hidden(q_pos, torch.arange(kv_len, device=device), window)


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


def _mask_for_base(base: str, attn: LayerAttention, query, key, positions):
    """The mask the base implementation needs on kvbench's cache, or None (its own causal rule suffices).

    `positions` (see `attention_column_sums`), when given, place the keys (a sliding layer with gaps); else
    the keys are the newest kv_len positions in order."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if base == "flash_attention_2":
        return None  # bottom-right causal and its own window, on keys in position order
    if positions is not None:
        key_pos, end = positions
        visible = ~hidden(torch.arange(end - q_len, end, device=query.device), key_pos, attn.window)
        visible = visible.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    elif (q_len > 1 and kv_len != q_len) or (attn.window and kv_len > attn.window):
        visible = visible_mask(q_len, kv_len, query.device, attn.window)[None, None]
    else:
        return None
    if base == "sdpa":
        return visible
    mask = torch.zeros(visible.shape, dtype=query.dtype, device=query.device)
    return mask.masked_fill(~visible, torch.finfo(query.dtype).min)


def kvbench_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, kvbench_cache=None, **kwargs
):
    if kvbench_cache is not None and hasattr(kvbench_cache, "sequences"):  # several sequences (engine.batch)
        return _per_sequence(module, query, kvbench_cache, scaling, dropout, kwargs), None
    sinks = kwargs.pop("s_aux", None)
    attn = LayerAttention(
        query.shape[-1] ** -0.5 if scaling is None else scaling,
        window=kwargs.pop("sliding_window", None) or None,
        softcap=kwargs.pop("softcap", None) or None,
        sinks=None if sinks is None else sinks.float(),
    )
    layer = kvbench_cache.layers[module.layer_idx] if kvbench_cache is not None else None
    if layer is not None and layer.ragged is not None:  # per-head budgets after the prompt
        return layer.ragged.attention(query, attn), None
    positions = layer.positions(query.shape[2]) if layer is not None and attn.window else None
    base = getattr(module.config, "kvbench_base_attention", None) or "sdpa"
    # a base that cannot run this layer on kvbench's cache: kvbench computes it (exact, in query blocks)
    if base == "flash_attention_2":  # flash-attn takes a softcap and a window on keys in position order
        own = attn.sinks is not None or positions is not None
    else:
        own = not attn.plain
    q_len = query.shape[2]
    kwargs.pop("is_causal", None)
    request = kvbench_cache.stats_request(module.layer_idx, q_len) if kvbench_cache is not None else StatsRequest()
    if q_len == 1 and request.row and not request.colsum and not request.window and attn.plain and not attn.window:
        # a decode step whose method needs the attention row, on a plain layer: one softmax gives both
        out, row = attention_with_row(query, key, value, attn.scaling)
        stats = Stats(n_queries=1, row=row)
    elif not request.window and (request.colsum or request.row or own):
        # one blocked pass gives the output and the column sums (H2O, VATP, WeightedKV at the prompt; a
        # decode step's row): the prompt costs one attention pass, not the base's plus the statistics'
        colsum, out = attention_column_sums(query, key, attn, value=value, positions=positions)
        keep_sums = request.colsum or (request.row and q_len > 1)
        stats = Stats(n_queries=q_len, colsum=colsum if keep_sums else None, row=colsum if request.row else None)
    else:
        if own:
            _, out = attention_column_sums(query, key, attn, value=value, positions=positions)
        else:
            mask = _mask_for_base(base, attn, query, key, positions)
            if base == "flash_attention_2":
                kwargs.update(sliding_window=attn.window, softcap=attn.softcap)
            with _no_cudnn(query):
                out, _ = _base_function(base)(module, query, key, value, mask, scaling=attn.scaling, dropout=dropout,
                                              **kwargs)
        stats = compute_stats(request, query, key, attn, positions) if request.any() else Stats(n_queries=q_len)
    if request.window_probs:
        stats.window_probs = window_probs(query, key, request.window_probs, attn, positions)
    if request.window_queries:
        stats.window_queries = query[:, :, -min(request.window_queries, q_len):]
    if request.queries:
        stats.queries, stats.rope = prerope_queries(kvbench_cache, module.layer_idx, query)
    if request.out_proj:
        stats.out_proj = output_projection(module)
    if kvbench_cache is not None:
        kvbench_cache.after_attention(module.layer_idx, stats)
    return out, None


# SDPA's backends without cuDNN's: cuDNN builds a plan per new shape and keeps a bounded cache of them, and a
# compressed cache shows it a new key length at every step in every layer whose length differs (CAKE, PyramidKV
# layer budgets): on an H200, `kvbench check` measured 20-30x slower decode steps with it, normal ones without
# (docs/gpu-check.md). Scoped to kvbench's own attention calls; the user's torch settings are untouched.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _no_cudnn(query):
    return sdpa_kernel(SDPA_BACKENDS) if query.is_cuda else contextlib.nullcontext()


def _per_sequence(module, query, batched, scaling, dropout, kwargs) -> torch.Tensor:
    """A BatchedCache's layer: each sequence's attention on its own cache, exactly as at batch 1."""
    layer = batched.layers[module.layer_idx]
    outs = [kvbench_attention(module, query[b : b + 1], key, value, None, scaling, dropout, kvbench_cache=cache,
                              **dict(kwargs))[0]
            for b, (cache, (key, value)) in enumerate(zip(batched.sequences, layer.pending, strict=True))]
    return torch.cat(outs)


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
    """Register kvbench's attention function and switch `model` to it, delegating to `base`. A model whose
    cache kvbench cannot hold (kvbench.engine.architecture) is refused here, before any sample."""
    if base not in BASE_IMPLEMENTATIONS:
        raise ValueError(f"unknown base attention {base!r}; choose one of {BASE_IMPLEMENTATIONS}")
    check_supported(model.config)
    AttentionInterface.register(NAME, kvbench_attention)
    model.config.kvbench_base_attention = base
    model.set_attn_implementation(NAME)


# ----------------------------------------------------------------------------- statistics


def _grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, q, D) -> (B, Hkv, G, q, D); query head h belongs to KV head h // G (transformers' repeat_kv)."""
    b, hq, q, d = query.shape
    return query.view(b, kv_heads, hq // kv_heads, q, d)


def _probs(query_g, key, attn: LayerAttention, q_pos, key_pos) -> torch.Tensor:
    """Softmax attention (float32) of a block of grouped queries at positions `q_pos` (q,) on `key` at
    positions `key_pos` ((k,), or (B, Hkv, k) per head), with the layer's softcap, window and sinks.

    Works in place on one float32 buffer of the block's logits; the sink's share is left out."""
    logits = torch.einsum("bhgqd,bhkd->bhgqk", query_g, key)
    logits = logits.float() if logits.dtype != torch.float32 else logits
    logits.mul_(attn.scaling)
    if attn.softcap is not None:
        logits.div_(attn.softcap).tanh_().mul_(attn.softcap)
    masked = hidden(q_pos, key_pos, attn.window)
    logits.masked_fill_(masked if masked.dim() == 2 else masked[:, :, None], float("-inf"))
    top = logits.amax(dim=-1, keepdim=True)
    if attn.sinks is not None:
        sink = attn.sinks.view(1, key.shape[1], -1, 1, 1).to(logits.device)
        top = torch.maximum(top, sink)
    logits.sub_(top).exp_()
    total = logits.sum(dim=-1, keepdim=True)
    if attn.sinks is not None:
        total = total + (sink - top).exp()
    return logits.div_(total)


def block_size(query, key) -> int:
    """Queries per block: a block of float32 logits holds about half the bytes of the layer's K and V,
    clamped to [MIN_BLOCK_ELEMENTS, MAX_BLOCK_ELEMENTS] elements."""
    layer_kv_bytes = 2 * key.numel() * key.element_size()
    elements = min(MAX_BLOCK_ELEMENTS, max(MIN_BLOCK_ELEMENTS, layer_kv_bytes // 8))  # fp32: half the bytes
    return max(1, elements // max(1, query.shape[0] * query.shape[1] * key.shape[2]))


def attention_column_sums(query, key, attn=None, block: int | None = None, first: int = 0, value=None,
                          positions: tuple[torch.Tensor, int] | None = None):
    """s_j = sum_i A_ij over the queries i >= `first` (causal), averaged over the query heads of a KV group.

    `attn` is the layer's `LayerAttention` (or a scaling factor). The queries are the newest q_len tokens;
    the keys are in position order unless `positions` = (key positions (B, Hkv, kv), the position after the
    newest query) places them (cached keys older than every query, the new ones last). Computed in query
    blocks so memory is O(block * kv_len), never O(q_len * kv_len). With `value`, the same pass also gives the attention output, (B, q_len, Hq, D) as the
    base implementations return it: returns (sums, output), one attention pass instead of two.
    """
    b, hq, q_len, d = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    attn = LayerAttention.of(attn, d)
    block = block or block_size(query, key)
    query_g = _grouped(query, kv_heads)
    out = torch.zeros(b, kv_heads, kv_len, dtype=torch.float32, device=key.device)
    offset = kv_len - q_len
    if positions is not None:
        key_pos, q_base = positions[0], positions[1] - q_len
    else:
        key_pos, q_base = torch.arange(kv_len, device=key.device), offset
    output = None if value is None else query.new_empty(query_g.shape[:3] + (q_len, value.shape[-1]))
    for start in range(first, q_len, block):
        stop = min(start + block, q_len)
        visible = offset + stop  # causal: this block sees no key past its last query
        q_pos = torch.arange(q_base + start, q_base + stop, device=key.device)
        probs = _probs(query_g[:, :, :, start:stop], key[:, :, :visible], attn, q_pos, key_pos[..., :visible])
        out[:, :, :visible] += probs.sum(dim=3).mean(dim=2)
        if output is not None:
            weights = probs if value.dtype == torch.float32 else probs.to(value.dtype)
            output[:, :, :, start:stop] = torch.einsum("bhgqk,bhkd->bhgqd", weights, value[:, :, :visible])
    if output is None:
        return out
    return out, output.view(b, hq, q_len, -1).transpose(1, 2).contiguous()


def attention_window(query, key, window: int, attn=None, block: int | None = None, positions=None) -> torch.Tensor:
    """Mean attention of the last `window` queries on each key (group-averaged), in query blocks."""
    q_len = query.shape[2]
    w = min(window, q_len)
    return attention_column_sums(query, key, attn, block, first=q_len - w, positions=positions).div_(w)


def window_probs(query, key, window: int, attn=None, positions=None) -> torch.Tensor:
    """The softmax rows (B, Hq, w, kv_len) float32 of the last w = min(`window`, q_len) queries (causal)."""
    w = min(window, query.shape[2])
    attn = LayerAttention.of(attn, query.shape[-1])
    key_pos = positions[0] if positions is not None else torch.arange(key.shape[2], device=key.device)
    q_end = positions[1] if positions is not None else key.shape[2]
    probs = _probs(_grouped(query[:, :, -w:], key.shape[1]), key, attn,
                   torch.arange(q_end - w, q_end, device=key.device), key_pos)
    return probs.reshape(query.shape[0], query.shape[1], w, key.shape[2])


def attention_with_row(query, key, value, scaling=None):
    """Attention of one query per head on every key (a plain layer), and its softmax row averaged over each
    KV group: the output (B, 1, Hq, D) as the base implementations return it, the row (B, Hkv, kv_len)."""
    b, hq, _, d = query.shape
    scaling = d**-0.5 if scaling is None else scaling
    query_g = _grouped(query, key.shape[1])  # (B, Hkv, G, 1, D)
    logits = torch.einsum("bhgqd,bhkd->bhgqk", query_g, key).mul_(scaling)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights = probs if value.dtype == torch.float32 else probs.to(value.dtype)
    out = torch.einsum("bhgqk,bhkd->bhgqd", weights, value).reshape(b, 1, hq, d)  # q = 1: (B, Hq, 1) = (B, 1, Hq)
    return out, probs.mean(dim=(2, 3))


def compute_stats(request: StatsRequest, query, key, attn=None, positions=None) -> Stats:
    stats = Stats(n_queries=query.shape[2])
    if request.colsum or (request.row and query.shape[2] > 1):
        stats.colsum = attention_column_sums(query, key, attn, positions=positions)
    if request.window:
        # per query head (`gqa: expand`): the KV heads repeated to every query head first, as repeat_kv does
        groups = query.shape[1] // key.shape[1] if request.per_query_head else 1
        window_keys = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        if groups > 1 and positions is not None:
            positions = (positions[0].repeat_interleave(groups, dim=1), positions[1])
        stats.window = attention_window(query, window_keys, request.window, attn, positions=positions)
    if request.row:
        # a single decode query: its row is the column sum of one query
        stats.row = stats.colsum if query.shape[2] > 1 else attention_column_sums(query, key, attn, positions=positions)
    return stats


def output_projection(module) -> torch.Tensor:
    """`StatsRequest.out_proj`: the layer's output projection weight (hidden, query_heads x head_dim)."""
    proj = getattr(module, "o_proj", None)
    if proj is None or getattr(proj, "weight", None) is None:
        raise KVBenchError(f"this method weighs values by the layer's output projection, and "
                           f"{type(module).__name__} has no o_proj weight: choose a method without method.critical")
    return proj.weight


# ----------------------------------------------------------------------------- queries before RoPE


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(rotary, positions: torch.Tensor, head_dim: int, layer_type: str = "full_attention"):
    """cos, sin (n, head_dim) float32: the model's RoPE (`rotary`, its decoder's `rotary_emb`) at `positions`
    (n,), as the model applies it to a layer of `layer_type`: x cos + rotate_half(x) sin, its attention scaling
    included; a model with one RoPE per layer type (Gemma 3) uses the layer type's; half-width tables
    (gpt-oss, which rotates the two halves as rotate_half does) are widened."""
    probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
    ids = positions.reshape(1, -1)
    if hasattr(rotary, f"{layer_type}_inv_freq"):
        cos, sin = rotary(probe, ids, layer_type)
    else:
        cos, sin = rotary(probe, ids)
    cos, sin = cos.reshape(-1, cos.shape[-1]).float(), sin.reshape(-1, sin.shape[-1]).float()
    if 2 * cos.shape[-1] == head_dim:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    if cos.shape[-1] != head_dim:
        raise KVBenchError(f"the model's RoPE rotates {cos.shape[-1]} of {head_dim} channels (partial rotary): "
                           "kvbench cannot give a method its queries before RoPE")
    return cos, sin


def prerope_queries(cache, layer_idx: int, query: torch.Tensor):
    """`StatsRequest.queries`: the call's queries (B, Hq, q, D) with RoPE undone, in their own dtype, and the
    layer's RoPE as a function positions -> (cos, sin) (`rope_tables`). The queries sit at the q positions
    before `cache.position_end` (what the driver gave the model); RoPE is undone in float32, in blocks of
    queries: q = (x cos - rotate_half(x) sin) / (cos^2 + sin^2), exact for any attention scaling."""
    rotary = getattr(cache, "rotary", None)
    if rotary is None:
        raise KVBenchError("this method needs the queries before RoPE, and the model has no rotary embedding "
                           "(model.get_decoder().rotary_emb)")
    batch, heads, q_len, dim = query.shape
    end = cache.position_end
    if end < q_len:
        raise KVBenchError("queries before RoPE need the positions the model was given: drive the cache with "
                           "CompressedCache.next_position_ids (Session does)")
    rope = functools.partial(rope_tables, rotary, head_dim=dim, layer_type=cache.layers[layer_idx].layer_type)
    out = torch.empty_like(query)
    step = max(1, MIN_BLOCK_ELEMENTS // (batch * heads * dim))
    for start in range(0, q_len, step):
        stop = min(start + step, q_len)
        cos, sin = rope(torch.arange(end - q_len + start, end - q_len + stop, device=query.device))
        x = query[:, :, start:stop].float()
        out[:, :, start:stop] = (x * cos - rotate_half(x) * sin).div_(cos * cos + sin * sin)
    return out, rope
