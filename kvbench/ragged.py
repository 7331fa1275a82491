"""A ragged KV store for per-head budgets (HeadKV, Ada-SnapKV, PyramidKV), and attention over it.

After the prompt, each (sequence, KV head) keeps its own number of tokens. The
store holds them packed, one segment after another, so the bytes stored are
the sum of the head budgets; nothing is padded to the largest head:

    prefix_keys, prefix_values   (N, head_dim), N = sum of the kept lengths
    cu_lens                      (B * H + 1,) int32, segment i = (b, h) with i = b * H + h
    decode_keys, decode_values   (B, capacity, H, head_dim): tokens generated after the prompt

Decoded tokens are appended to every head (the methods are prefill-only), so
they form a dense block with the same count in every head; a decode step
writes one slot per head into reserved capacity and never copies the prefix
(capacity doubles, copying only the decoded tokens, if a run outlasts it).

Attention of new queries = softmax over [prefix segment of the head, decoded
tokens], computed as two partial attentions merged by their log-sum-exp:

- with flash-attn on CUDA (fp16/bf16): `flash_attn_varlen_func` over the packed
  segments (each (b, h) is one sequence whose G query heads share its single
  KV head) and `flash_attn_func` over the decoded block (causal, bottom-right);
- otherwise an exact padded fallback: the segments are gathered into a
  transient (B, H, max_len, head_dim) tensor for one layer at a time, masked,
  and attended in float32. The store itself stays packed.
"""

from __future__ import annotations

import torch

try:  # optional: the `gpu` extra
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = flash_attn_varlen_func = None


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Softmax attention over the union of two key sets from the attention over each.

    out_*: (..., d), lse_*: (...) log-sum-exp of the scaled logits. Computed in float32."""
    top = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - top)[..., None], torch.exp(lse_b - top)[..., None]
    return (out_a.float() * wa + out_b.float() * wb) / (wa + wb)


def _probs_lse(logits: torch.Tensor):
    """Softmax probabilities and log-sum-exp of masked float32 logits (-inf where not visible)."""
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[..., None])
    if not torch.isfinite(lse).all():  # a head with no token in this part: its row is all zeros
        probs = probs.nan_to_num(0.0)
    return probs, lse


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
        self._padding: tuple[torch.Tensor, torch.Tensor] | None = None  # built on first use by the fallback
        self.decode_keys = keys.new_empty(batch, max(1, reserve), heads, head_dim)
        self.decode_values = torch.empty_like(self.decode_keys)
        self.decoded = 0

    # -- storage
    @property
    def kept_per_head(self) -> torch.Tensor:
        """(B, H) tokens each head holds now: its prefix segment plus the decoded tokens."""
        return self.lens + self.decoded

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write new tokens (B, H, q, d) into the decoded block: one slot per head each, no prefix copy."""
        q = key_states.shape[2]
        if self.decoded + q > self.decode_keys.shape[1]:
            capacity = max(self.decoded + q, 2 * self.decode_keys.shape[1])
            for name in ("decode_keys", "decode_values"):
                old = getattr(self, name)
                new = old.new_empty(self.batch, capacity, self.heads, self.head_dim)
                new[:, : self.decoded] = old[:, : self.decoded]
                setattr(self, name, new)
        new = slice(self.decoded, self.decoded + q)
        self.decode_keys[:, new] = key_states.transpose(1, 2)
        self.decode_values[:, new] = value_states.transpose(1, 2)
        self.decoded += q

    # -- attention
    def attention(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Output (B, q, Hq, d) of `query` (B, Hq, q, d) on this store; the new tokens are already appended."""
        use_varlen = (
            flash_attn_varlen_func is not None
            and query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16)
        )
        out = self._varlen(query, scaling) if use_varlen else self._padded(query, scaling)
        return out.to(query.dtype)

    def padding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, valid), each (B, H, max_len): where each head's j-th token sits in the packed store."""
        if self._padding is None:
            slots = torch.arange(self.max_len, device=self.lens.device)
            valid = slots < self.lens[..., None]
            start = self.cu_lens[:-1].view(self.batch, self.heads, 1).long()
            index = (start + slots).clamp(max=max(0, self.prefix_keys.shape[0] - 1))
            self._padding = index, valid
        return self._padding

    def _decoded_block(self):
        return self.decode_keys[:, : self.decoded], self.decode_values[:, : self.decoded]

    def _padded(self, query, scaling):
        b, hq, q, d = query.shape
        g = hq // self.heads
        query_g = query.reshape(b, self.heads, g * q, d).float()  # rows: (group member, query)
        # prefix: every new query sees its head's whole segment
        index, valid = self.padding()
        flat = index.flatten()
        keys = self.prefix_keys.index_select(0, flat).view(b, self.heads, self.max_len, d).float()  # transient
        values = self.prefix_values.index_select(0, flat).view(b, self.heads, self.max_len, d).float()
        logits = torch.matmul(query_g, keys.transpose(2, 3)).mul_(scaling)
        logits.masked_fill_(~valid[:, :, None, :], float("-inf"))
        probs, lse_prefix = _probs_lse(logits)
        out_prefix = torch.matmul(probs, values)
        # decoded block: bottom-right causal among the new queries
        dkeys, dvalues = (x.transpose(1, 2).float() for x in self._decoded_block())  # (B, H, n, d)
        logits = torch.matmul(query_g, dkeys.transpose(2, 3)).mul_(scaling)
        n = dkeys.shape[2]
        visible = torch.arange(n, device=query.device)[None, :] <= torch.arange(q, device=query.device)[:, None] + n - q
        logits.masked_fill_(~visible.repeat(g, 1), float("-inf"))
        probs, lse_decoded = _probs_lse(logits)
        out_decoded = torch.matmul(probs, dvalues)
        out = merge_partials(out_prefix, lse_prefix, out_decoded, lse_decoded)  # (B, H, G * q, d)
        return out.view(b, hq, q, d).transpose(1, 2).contiguous()

    def _varlen(self, query, scaling):  # pragma: no cover - needs CUDA and flash-attn
        b, hq, q, d = query.shape
        h = self.heads
        g = hq // h
        # prefix: each (b, h) segment is one varlen sequence of q queries x g heads on 1 KV head
        packed_q = query.view(b, h, g, q, d).permute(0, 1, 3, 2, 4).reshape(b * h * q, g, d).contiguous()
        cu_q = torch.arange(0, b * h + 1, device=query.device, dtype=torch.int32) * q
        out_p, lse_p, _ = flash_attn_varlen_func(
            packed_q, self.prefix_keys[:, None], self.prefix_values[:, None], cu_q, self.cu_lens, q, self.max_len,
            softmax_scale=scaling, causal=False, return_attn_probs=True,
        )
        out_p = out_p.view(b, h, q, g, d).permute(0, 1, 3, 2, 4)  # (B, H, G, q, d)
        lse_p = lse_p.view(g, b, h, q).permute(1, 2, 0, 3)  # flash-attn 2 varlen: (heads, total_q)
        # decoded block: causal, aligned to the bottom right
        dkeys, dvalues = self._decoded_block()
        out_d, lse_d, _ = flash_attn_func(
            query.transpose(1, 2), dkeys, dvalues, softmax_scale=scaling, causal=True, return_attn_probs=True,
        )
        out_d = out_d.view(b, q, h, g, d).permute(0, 2, 3, 1, 4)
        lse_d = lse_d.view(b, h, g, q)
        out = merge_partials(out_p, lse_p, out_d, lse_d)
        return out.reshape(b, hq, q, d).transpose(1, 2).contiguous()
