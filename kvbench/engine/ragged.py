"""A ragged KV store for per-head budgets (HeadKV, Ada-SnapKV, PyramidKV), and attention over it.

After the prompt, each (sequence, KV head) keeps its own number of tokens. The
store holds them packed, one segment after another, so the bytes stored are
the sum of the head budgets; nothing is padded to the largest head:

    prefix_keys, prefix_values   (N, head_dim), N = sum of the kept lengths
    cu_lens                      (B * H + 1,) int32, segment i = (b, h) with i = b * H + h
    decode_keys, decode_values   (B, H, capacity, head_dim): tokens generated after the prompt

H is the store's head count: the model's KV heads, or its query heads when a
method stores one segment per query head (G = 1). Decoded tokens are appended
to every head (the methods are prefill-only), so they form a dense block with
the same count in every head; a decode step writes one slot per head into
reserved capacity and never copies the prefix (capacity doubles, copying only
the decoded tokens, if a run outlasts it).

Attention of new queries = softmax over [prefix segment of the head, decoded
tokens], computed as two partial attentions merged by their log-sum-exp:

- with flash-attn on CUDA (fp16/bf16): `flash_attn_varlen_func` over the packed
  segments (each (b, h) is one sequence whose G query heads share its single
  KV head) and `flash_attn_func` over the decoded block (causal, bottom-right);
- otherwise (the CPU, or no flash-attn) an exact sparse path whose cost follows
  the tokens stored: the prefix logits are a sampled matmul (SDDMM) of the
  queries with the packed keys on a fixed CSR pattern (row = one query of one
  segment, columns = that segment's tokens), an unnormalised softmax per row by
  segment reductions, and a sparse-times-dense product with the packed values;
  the decoded block joins the same softmax (rescaled by the larger maximum).
  Every stored key and value is read once and none is copied (in half
  precision the store is read into float32, as torch's sparse kernels need it).
"""

from __future__ import annotations

import warnings

import torch

from kvbench.engine.attention import LayerAttention
from kvbench.engine.quantized import QuantizedSegments

try:  # optional: the `gpu` extra
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = flash_attn_varlen_func = None

SPARSE_DTYPES = (torch.float32, torch.float64)  # what torch's CSR kernels compute in


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Softmax attention over the union of two key sets from the attention over each.

    out_*: (..., d), lse_*: (...) log-sum-exp of the scaled logits. Computed in float32."""
    top = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - top)[..., None], torch.exp(lse_b - top)[..., None]
    return (as_float(out_a) * wa + as_float(out_b) * wb) / (wa + wb)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """x in float32 (itself when it already is: no op dispatched)."""
    return x if x.dtype == torch.float32 else x.float()


def csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size) -> torch.Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta": the kernels used here are the stable ones
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class SegmentPattern:
    """The CSR pattern of `rows` queries per segment on the packed prefix (built once per query count)."""

    def __init__(self, lens: torch.Tensor, cu_lens: torch.Tensor, rows: int):
        segments = lens.numel()
        self.row_lens = lens.repeat_interleave(rows)  # (segments * rows,)
        crow = torch.zeros(segments * rows + 1, dtype=torch.long, device=lens.device)
        crow[1:] = self.row_lens.cumsum(0)
        nnz = int(crow[-1])
        self.row_of = torch.repeat_interleave(torch.arange(segments * rows, device=lens.device), self.row_lens,
                                              output_size=nnz)
        start = cu_lens[:-1].long().repeat_interleave(rows)  # where each row's segment begins in the store
        col = torch.arange(nnz, device=lens.device) - crow[:-1][self.row_of] + start[self.row_of]
        self.crow, self.col, self.shape = crow, col, (segments * rows, int(cu_lens[-1]))
        self.empty = csr(crow, col, torch.zeros(nnz, device=lens.device), self.shape)

    def partial(self, query, keys_t, values, scaling, softcap=None):
        """Unnormalised softmax attention of `query` (rows, d) on the pattern with the keys `keys_t` (d, N):
        (Σ w v, Σ w, max logit) per row, with w = exp(logit - max); a row with no token gives (0, 0, -inf).
        The weights overwrite the logits inside the sampled product's CSR tensor, which then multiplies
        the values (no second sparse tensor is built)."""
        sampled = torch.sparse.sampled_addmm(self.empty, query, keys_t, beta=0.0, alpha=scaling)
        logits = sampled.values()
        if softcap is not None:
            logits.div_(softcap).tanh_().mul_(softcap)
        top = torch.segment_reduce(logits, "max", lengths=self.row_lens)
        weights = logits.sub_(top[self.row_of]).exp_()
        total = torch.segment_reduce(weights, "sum", lengths=self.row_lens)
        return sampled @ values, total, top


class RaggedKV:
    """The packed store of one layer; see the module docstring."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, pos: torch.Tensor,
                 reserve: int):
        """Pack the tokens where `keep` (B, H, n) is True out of dense `keys`/`values` (B, H, n, d).

        Tokens stay in slot order within a head (the caller keeps the prompt in position order)."""
        batch, heads, _, head_dim = keys.shape
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.prefix_keys = keys[keep]  # row-major over (b, h, slot): segment after segment
        self.prefix_values = values[keep]
        self.prefix_pos = pos[keep]
        self.lens = keep.sum(dim=-1)  # (B, H)
        lens = self.lens.flatten()
        self.cu_lens = torch.zeros(lens.numel() + 1, dtype=torch.int32, device=keys.device)
        self.cu_lens[1:] = lens.cumsum(0)
        self.max_len = int(lens.max()) if lens.numel() else 0
        self._patterns: dict[int, SegmentPattern] = {}  # rows per segment -> CSR pattern, built on first use
        self.decode_keys = keys.new_empty(batch, heads, max(1, reserve), head_dim)
        self.decode_values = torch.empty_like(self.decode_keys)
        self.decoded = 0
        self._float_prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys^T, values) for the CSR kernels
        self.quantized: QuantizedSegments | None = None  # KIVI (method.quant): the prefix held quantized
        self.key_channels: torch.Tensor | None = None  # ThinK (method.key_channels): the channels each segment keeps

    def quantize(self, bits: int, group: int, residual: int) -> None:
        """Hold the prompt's segments KIVI-quantized (`QuantizedSegments`); the attention reads them dequantized.
        Decoded tokens stay in the full-precision decode block."""
        self.quantized = QuantizedSegments(self.prefix_keys, self.prefix_values, self.lens.flatten(), bits, group,
                                           residual)
        self.prefix_keys = self.prefix_values = self._float_prefix = None

    def prune_keys(self, kept: torch.Tensor) -> None:
        """Hold only the key channels `kept` (segments, D') of each segment (ThinK); the attention reads the others
        as zero. Decoded tokens keep every channel."""
        segment = torch.repeat_interleave(torch.arange(kept.shape[0], device=kept.device), self.lens.flatten(),
                                          output_size=self.prefix_keys.shape[0])
        self.key_channels = kept
        self.prefix_keys = self.prefix_keys.gather(1, kept[segment])
        self._float_prefix = None

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed prompt's keys and values (N, head_dim), as the attention reads them."""
        if self.quantized is not None:
            return self.quantized.dequantize()
        if self.key_channels is not None:
            segment = torch.repeat_interleave(torch.arange(self.key_channels.shape[0], device=self.lens.device),
                                              self.lens.flatten(), output_size=self.prefix_keys.shape[0])
            keys = self.prefix_keys.new_zeros(self.prefix_keys.shape[0], self.head_dim)
            return keys.scatter_(1, self.key_channels[segment], self.prefix_keys), self.prefix_values
        return self.prefix_keys, self.prefix_values

    @property
    def nbytes(self) -> int:
        """Bytes the store holds for its sequences: the packed prompt (or its quantization) and the decoded tokens."""
        held = (self.prefix_keys, self.prefix_values, self.key_channels)
        prefix = self.quantized.nbytes if self.quantized is not None else \
            sum(t.numel() * t.element_size() for t in held if t is not None)
        decoded = 2 * self.batch * self.heads * self.decoded * self.head_dim * self.decode_keys.element_size()
        return prefix + decoded

    # -- storage
    @property
    def kept_per_head(self) -> torch.Tensor:
        """(B, H) tokens each head holds now: its prefix segment plus the decoded tokens."""
        return self.lens + self.decoded

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write new tokens (B, H, q, d) into the decoded block: one slot per head each, no prefix copy."""
        q = key_states.shape[2]
        if self.decoded + q > self.decode_keys.shape[2]:
            capacity = max(self.decoded + q, 2 * self.decode_keys.shape[2])
            for name in ("decode_keys", "decode_values"):
                old = getattr(self, name)
                new = old.new_empty(self.batch, self.heads, capacity, self.head_dim)
                new[:, :, : self.decoded] = old[:, :, : self.decoded]
                setattr(self, name, new)
        self.decode_keys.narrow(2, self.decoded, q).copy_(key_states)
        self.decode_values.narrow(2, self.decoded, q).copy_(value_states)
        self.decoded += q

    # -- attention
    def attention(self, query: torch.Tensor, attn) -> torch.Tensor:
        """Output (B, q, Hq, d) of `query` (B, Hq, q, d) on this store; the new tokens are already appended.

        `attn` is the layer's `LayerAttention` (scaling, softcap, sinks; a per-head store never holds a
        sliding-window layer), or a scaling factor."""
        attn = LayerAttention.of(attn, query.shape[-1])
        use_varlen = (
            flash_attn_varlen_func is not None
            and query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16)
            and attn.sinks is None  # flash-attn 2 has no sink logit
        )
        out = self._varlen(query, attn) if use_varlen else self._sparse(query, attn)
        return out if out.dtype == query.dtype else out.to(query.dtype)

    def pattern(self, rows: int) -> SegmentPattern:
        if rows not in self._patterns:
            self._patterns[rows] = SegmentPattern(self.lens.flatten(), self.cu_lens, rows)
        return self._patterns[rows]

    def _decoded_block(self):
        """The decoded tokens' keys and values, (B, H, n, d)."""
        return self.decode_keys.narrow(2, 0, self.decoded), self.decode_values.narrow(2, 0, self.decoded)

    def _prefix_for_sparse(self):
        """(keys^T (d, N), values (N, d)) in a dtype torch's CSR kernels compute in: the store itself, or
        its float32 copy made at every step (half precision)."""
        if self.quantized is not None or self.key_channels is not None:
            keys, values = self.prefix()
            return as_float(keys).t(), as_float(values)
        if self.prefix_keys.dtype not in SPARSE_DTYPES:
            return self.prefix_keys.float().t(), self.prefix_values.float()
        if self._float_prefix is None:  # the transposed view, made once
            self._float_prefix = (self.prefix_keys.t(), self.prefix_values)
        return self._float_prefix

    def _sparse(self, query, attn):
        scaling, softcap = attn.scaling, attn.softcap
        b, hq, q, d = query.shape
        g = hq // self.heads
        query_g = as_float(query.reshape(b, self.heads, g * q, d))  # rows: (group member, query)
        # prefix: every new query sees its head's whole segment
        keys_t, values = self._prefix_for_sparse()
        acc, total, top = self.pattern(g * q).partial(query_g.view(-1, d), keys_t, values, scaling, softcap)
        rows = (b, self.heads, g * q, 1)  # the row statistics keep a last dim of 1: they broadcast as they are
        # decoded block: bottom-right causal among the new queries, one softmax with the prefix's partial
        dkeys, dvalues = self._decoded_block()  # (B, H, n, d)
        n = dkeys.shape[2]
        logits = torch.einsum("bhrd,bhnd->bhrn", query_g, as_float(dkeys)).mul_(scaling)
        if softcap is not None:
            logits.div_(softcap).tanh_().mul_(softcap)
        if q > 1:
            newest = torch.arange(q, device=query.device).repeat(g)[:, None] + n - q  # row r = (member, query)
            logits.masked_fill_(torch.arange(n, device=query.device)[None, :] > newest, float("-inf"))
        top_prefix = top.view(rows)
        top = torch.maximum(top_prefix, logits.amax(dim=-1, keepdim=True))  # finite: a query sees its own token
        if attn.sinks is not None:  # row r = (member, query): the sink of query head h * g + member
            sink = attn.sinks.view(1, self.heads, g, 1).repeat_interleave(q, dim=2).to(top.device)
            top = torch.maximum(top, sink)
        scale = (top_prefix - top).exp_()  # rescales the prefix's partial (0 for a head with no prefix)
        weights = logits.sub_(top).exp_()
        total = total.view(rows).mul_(scale).add_(weights.sum(dim=-1, keepdim=True))
        if attn.sinks is not None:
            total = total + (sink - top).exp()
        out = torch.einsum("bhrn,bhnd->bhrd", weights, as_float(dvalues))
        out = out.add_(acc.view(*rows[:3], d).mul_(scale)).div_(total)
        return out.view(b, hq, q, d).transpose(1, 2)

    def _varlen(self, query, attn):  # pragma: no cover - needs CUDA and flash-attn
        scaling, softcap = attn.scaling, attn.softcap or 0.0
        b, hq, q, d = query.shape
        h = self.heads
        g = hq // h
        # prefix: each (b, h) segment is one varlen sequence of q queries x g heads on 1 KV head
        packed_q = query.view(b, h, g, q, d).permute(0, 1, 3, 2, 4).reshape(b * h * q, g, d).contiguous()
        cu_q = torch.arange(0, b * h + 1, device=query.device, dtype=torch.int32) * q
        prefix_keys, prefix_values = self.prefix()
        out_p, lse_p, _ = flash_attn_varlen_func(
            packed_q, prefix_keys[:, None], prefix_values[:, None], cu_q, self.cu_lens, q, self.max_len,
            softmax_scale=scaling, causal=False, softcap=softcap, return_attn_probs=True,
        )
        out_p = out_p.view(b, h, q, g, d).permute(0, 1, 3, 2, 4)  # (B, H, G, q, d)
        lse_p = lse_p.view(g, b, h, q).permute(1, 2, 0, 3)  # flash-attn 2 varlen: (heads, total_q)
        # decoded block: causal, aligned to the bottom right; flash-attn takes (B, n, H, d) (last dim contiguous)
        dkeys, dvalues = self._decoded_block()
        out_d, lse_d, _ = flash_attn_func(
            query.transpose(1, 2), dkeys.transpose(1, 2), dvalues.transpose(1, 2), softmax_scale=scaling, causal=True, softcap=softcap,
            return_attn_probs=True,
        )
        out_d = out_d.view(b, q, h, g, d).permute(0, 2, 3, 1, 4)
        lse_d = lse_d.view(b, h, g, q)
        out = merge_partials(out_p, lse_p, out_d, lse_d)
        return out.reshape(b, hq, q, d).transpose(1, 2).contiguous()
