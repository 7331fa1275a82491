"""KIVI-style quantized KV store: keys per channel, values per token, the newest tokens in full precision.

KIVI (Liu et al., arXiv:2402.02750; github.com/jy-yuan/KIVI) quantizes a group x_1..x_G that shares one
(scale, zero) asymmetrically, round-to-nearest at b bits (b = 2 or 4):

    zero = min x,   scale = (max x - min x) / (2^b - 1),
    code = clamp(round((x - zero) / scale), 0, 2^b - 1)      (torch.round: halves to even)
    x^   = code * scale + zero,                              |x - x^| <= scale / 2

- keys, per channel: a group is one channel of one head over G consecutive tokens; scale/zero (B, H, n/G, D);
- values, per token: a group is G consecutive channels of one token; scale/zero (B, H, n, D/G).

Codes are packed along the channels, 8/b codes per byte with the first code in the low bits (KIVI's order
inside its int32 words): every token's codes are one row of D*b/8 bytes, so a token can be dropped alone
(eviction) without repacking. scale and zero are kept in the input dtype (fp16/bf16 for a model) and the
arithmetic runs in it, as in KIVI (fp16) and optimum-quanto: the codes and dequantized values are then
theirs bit for bit, and a scale costs the 2 bytes KIVI counts. A constant group (max = min) gets scale 0 and
codes 0 and dequantizes exactly (the references divide 0 by 0 there).

`QuantizedSegments` holds a ragged store's packed prompt (per-head budgets), each head's segment quantized as a
QuantizedKV of its own would hold it. `QuantizedKV` holds one layer: quantized tokens then a full-precision residual of the newest tokens, in slot
order. When an append brings the residual to R (`residual`, KIVI's residual_length, a multiple of G) tokens or
more, its oldest tokens are quantized, G at a time (a whole key group), until fewer than R remain; keys and
values share that boundary. `keep` drops tokens: a kept key keeps its codes and points at its group's scale
and zero (a per-token group index), so no kept token's dequantized value changes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

BITS = {"kivi2": 2, "kivi4": 4}  # method.quant -> bits


class Quantized(NamedTuple):
    codes: torch.Tensor  # uint8 (B, H, n, D * bits // 8), packed along the channels
    scale: torch.Tensor  # keys (B, H, groups, D); values (B, H, n, D // G); the input dtype
    zero: torch.Tensor  # same shape and dtype as scale: the group's minimum


def _check_bits(bits: int) -> None:
    if bits not in (2, 4):
        raise ValueError(f"KIVI quantizes to 2 or 4 bits, not {bits}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., D) < 2^bits -> (..., D * bits // 8): byte j holds codes j*k .. j*k + k - 1, k = 8 // bits,
    the first in the low bits."""
    per = 8 // bits
    grouped = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = grouped[..., 0].clone()
    for i in range(1, per):
        out |= grouped[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: (..., D * bits // 8) uint8 -> (..., D) uint8 codes."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & (2**bits - 1)).flatten(-2)


_TABLES: dict[tuple, torch.Tensor] = {}  # (bits, dtype, device) -> the codes of each of the 256 bytes


def _unpack_as(packed: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """`unpack` straight into `dtype`, one table lookup per byte (half the time of shifting and converting)."""
    key = (bits, dtype, packed.device)
    if key not in _TABLES:
        _TABLES[key] = unpack(torch.arange(256, dtype=torch.uint8, device=packed.device)[:, None], bits).to(dtype)
    return F.embedding(packed.long(), _TABLES[key]).flatten(-2)


def _quantize(x: torch.Tensor, dim: int, bits: int):
    """Codes (uint8, x's shape), scale and zero (dim kept, size 1) of the groups along `dim` of x."""
    top = 2**bits - 1
    zero = x.amin(dim, keepdim=True)
    scale = (x.amax(dim, keepdim=True) - zero) / top
    codes = ((x - zero) / scale.masked_fill(scale == 0, 1)).round_().clamp_(0, top).to(torch.uint8)
    return codes, scale, zero


def quantize_keys(k: torch.Tensor, bits: int, group: int) -> Quantized:
    """Keys (B, H, n, D), n a multiple of `group`, per channel over `group` consecutive tokens."""
    _check_bits(bits)
    b, h, n, d = k.shape
    if n % group:
        raise ValueError(f"keys are quantized in groups of {group} tokens; got {n} tokens")
    codes, scale, zero = _quantize(k.reshape(b, h, n // group, group, d), 3, bits)
    return Quantized(pack(codes.view(b, h, n, d), bits), scale.squeeze(3), zero.squeeze(3))


def quantize_values(v: torch.Tensor, bits: int, group: int) -> Quantized:
    """Values (B, H, n, D), D a multiple of `group`, per token over `group` consecutive channels."""
    _check_bits(bits)
    b, h, n, d = v.shape
    if d % group:
        raise ValueError(f"values are quantized in groups of {group} channels; head_dim {d} is not a multiple")
    codes, scale, zero = _quantize(v.reshape(b, h, n, d // group, group), 4, bits)
    return Quantized(pack(codes.view(b, h, n, d), bits), scale.squeeze(4), zero.squeeze(4))


def dequantize_keys(q: Quantized, bits: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """Keys (B, H, n, D) in the scale's dtype. Token t belongs to group `index[..., t]` (B, H, n), or by default
    to group t // G (the layout `quantize_keys` returns)."""
    codes = _unpack_as(q.codes, bits, q.scale.dtype)  # then code * scale + zero, in place
    b, h, n, d = codes.shape
    if index is not None:
        index = index.long()[..., None].expand(-1, -1, -1, d)
        return codes.mul_(q.scale.gather(2, index)).add_(q.zero.gather(2, index))
    groups = q.scale.shape[2]
    if n == 0:
        return codes
    return codes.view(b, h, groups, n // groups, d).mul_(q.scale[:, :, :, None]).add_(q.zero[:, :, :, None]) \
        .view(b, h, n, d)


def dequantize_values(q: Quantized, bits: int) -> torch.Tensor:
    """Values (B, H, n, D) in the scale's dtype."""
    codes = _unpack_as(q.codes, bits, q.scale.dtype)
    b, h, n, d = codes.shape
    groups = q.scale.shape[-1]
    return codes.view(b, h, n, groups, d // groups).mul_(q.scale[..., None]).add_(q.zero[..., None]).view(b, h, n, d)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, n, ...) at `index` (B, H, m) along dim 2."""
    return x.gather(2, index.view(*index.shape, *(1,) * (x.dim() - 3)).expand(-1, -1, -1, *x.shape[3:]))


class QuantizedKV:
    """One layer's KV for a batch of sequences: quantized tokens, then a full-precision residual window.

    Held (Nq quantized tokens, Nr residual ones, the same counts in every head):
        keys     codes (B, H, Nq, D*b/8) uint8, scale/zero (B, H, groups, D), and after a `keep` the group
                 of each token `key_index` (B, H, Nq) int32 (before it, token t is in group t // G)
        values   codes (B, H, Nq, D*b/8) uint8, scale/zero (B, H, Nq, D/G)
        residual keys, values (B, H, Nr, D) in the input dtype
    """

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 128):
        _check_bits(bits)
        if group <= 0 or residual < group or residual % group:
            raise ValueError(f"the residual window ({residual}) must be a positive multiple of the group ({group})")
        self.bits, self.group, self.residual = bits, group, residual
        self.k: Quantized | None = None
        self.v: Quantized | None = None
        self.key_index: torch.Tensor | None = None
        self.res_k: torch.Tensor | None = None
        self.res_v: torch.Tensor | None = None

    @property
    def quantized_length(self) -> int:
        return 0 if self.k is None else self.k.codes.shape[2]

    @property
    def residual_length(self) -> int:
        return 0 if self.res_k is None else self.res_k.shape[2]

    @property
    def length(self) -> int:
        return self.quantized_length + self.residual_length

    @property
    def batch(self) -> int:
        return self.res_k.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales, zeros, the group index (after a `keep`) and the residual."""
        held = [*(self.k or ()), *(self.v or ()), self.key_index, self.res_k, self.res_v]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add tokens (B, H, q, D) (a prompt, or one decode step) after the held ones; then quantize the
        residual's oldest tokens, G at a time, while it holds R or more."""
        if self.res_k is None:
            b, h, _, d = k.shape
            if d % self.group or d % (8 // self.bits):
                raise ValueError(f"head_dim {d} must be a multiple of the group {self.group} and of {8 // self.bits}")
            codes = torch.empty(b, h, 0, d * self.bits // 8, dtype=torch.uint8, device=k.device)
            self.k = Quantized(codes, k.new_empty(b, h, 0, d), k.new_empty(b, h, 0, d))
            self.v = Quantized(codes, v.new_empty(b, h, 0, d // self.group), v.new_empty(b, h, 0, d // self.group))
            self.res_k, self.res_v = k.clone(), v.clone()
        else:
            self.res_k, self.res_v = torch.cat((self.res_k, k), dim=2), torch.cat((self.res_v, v), dim=2)
        n = self.residual_length
        if n < self.residual:
            return
        m = ((n - self.residual) // self.group + 1) * self.group  # whole groups, leaving fewer than R
        new_k = quantize_keys(self.res_k[:, :, :m], self.bits, self.group)
        new_v = quantize_values(self.res_v[:, :, :m], self.bits, self.group)
        if self.key_index is not None:  # the new groups follow the held ones
            b, h, _ = self.key_index.shape
            first = self.k.scale.shape[2]
            new = torch.arange(first, first + m // self.group, device=k.device).repeat_interleave(self.group)
            self.key_index = torch.cat((self.key_index, new.to(torch.int32).expand(b, h, -1)), dim=2)
        self.k = Quantized(*(torch.cat(pair, dim=2) for pair in zip(self.k, new_k, strict=True)))
        self.v = Quantized(*(torch.cat(pair, dim=2) for pair in zip(self.v, new_v, strict=True)))
        self.res_k, self.res_v = self.res_k[:, :, m:].clone(), self.res_v[:, :, m:].clone()

    def keys(self) -> torch.Tensor:
        """All keys (B, H, length, D) in slot order, dequantized, in the input dtype."""
        return torch.cat((dequantize_keys(self.k, self.bits, self.key_index), self.res_k), dim=2)

    def values(self) -> torch.Tensor:
        """All values (B, H, length, D) in slot order, dequantized, in the input dtype."""
        return torch.cat((dequantize_values(self.v, self.bits), self.res_v), dim=2)

    def keep(self, indices: torch.Tensor) -> None:
        """Keep slots `indices` (B, H, C), distinct in each head, in slot order; drop the others.

        No kept token's dequantized key or value changes: a quantized key keeps its codes and its group's
        scale/zero (groups no kept token uses are freed, per head). Heads may keep different numbers of
        residual tokens; the residual takes the most any head keeps, and a head with fewer moves its newest
        kept quantized tokens into it as their dequantized values (so those are quantized again, in a new
        group, when the residual next fills up)."""
        idx = indices.sort(dim=-1).values
        c = idx.shape[-1]
        n_res = int((idx >= self.quantized_length).sum(-1).max()) if idx.numel() else 0
        q_idx, r_idx = idx[..., : c - n_res], idx[..., c - n_res :]
        b, h, nq = self.k.codes.shape[:3]
        index = self.key_index.long() if self.key_index is not None else \
            (torch.arange(nq, device=idx.device) // self.group).expand(b, h, -1)
        self.res_k, self.res_v = self._at(r_idx, index)
        scale, zero, index = self._used_groups(index.gather(2, q_idx))
        self.k = Quantized(_take(self.k.codes, q_idx), scale, zero)
        self.key_index = index.to(torch.int32)
        self.v = Quantized(*(_take(t, q_idx) for t in self.v))

    def _at(self, slots: torch.Tensor, key_group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, m, D) of `slots` (B, H, m), as `keys()` and `values()` give them, dequantizing
        only those slots (`key_group`: each quantized token's key group)."""
        nq, nr = self.quantized_length, self.residual_length
        parts_k, parts_v = [], []
        if nq:
            q = slots.clamp(max=nq - 1)
            codes = Quantized(_take(self.k.codes, q), self.k.scale, self.k.zero)
            parts_k.append(dequantize_keys(codes, self.bits, key_group.gather(2, q)))
            parts_v.append(dequantize_values(Quantized(*(_take(t, q) for t in self.v)), self.bits))
        if nr:
            r = (slots - nq).clamp(0, nr - 1)
            parts_k.append(_take(self.res_k, r))
            parts_v.append(_take(self.res_v, r))
        if len(parts_k) == 1:
            return parts_k[0], parts_v[0]
        residual = (slots >= nq)[..., None]
        return torch.where(residual, parts_k[1], parts_k[0]), torch.where(residual, parts_v[1], parts_v[0])

    def _used_groups(self, index: torch.Tensor):
        """The key groups that `index` (B, H, m) uses, renumbered in order per head: (scale, zero, new index);
        a head using fewer groups than another is padded with zeros."""
        b, h, groups, d = self.k.scale.shape
        used = torch.zeros(b, h, groups, dtype=torch.bool, device=index.device).scatter_(2, index, True)
        rank = used.cumsum(-1) - 1
        count = int(used.sum(-1).max()) if used.numel() else 0
        slot = rank.masked_fill(~used, count)[..., None].expand(-1, -1, -1, d)  # unused: one slot, cut off

        def move(x):
            return x.new_zeros(b, h, count + 1, d).scatter_(2, slot, x)[:, :, :count].clone()

        return move(self.k.scale), move(self.k.zero), rank.gather(2, index)


class QuantizedSegments:
    """KIVI on a ragged store's packed prompt (per-head budgets, `kvbench.engine.ragged`): each segment (one
    sequence's KV head) is a QuantizedKV of its own after its prompt was appended, flattened: its first m
    tokens quantized (m = ((n - R) // G + 1) x G when n >= R, else 0; keys per channel in groups of G of the
    segment's consecutive tokens, values per token in groups of G channels), its last n - m in full precision.

    keys (N, D) and values (N, D) packed segment after segment; `lens` (S,) the segment lengths."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lens: torch.Tensor, bits: int, group: int,
                 residual: int):
        _check_bits(bits)
        n, d = keys.shape
        if d % group or d % (8 // bits):
            raise ValueError(f"head_dim {d} must be a multiple of the group {group} and of {8 // bits}")
        self.bits, self.shape, self.dtype = bits, (n, d), keys.dtype
        starts = torch.cumsum(lens, 0) - lens
        segment = torch.repeat_interleave(torch.arange(len(lens), device=keys.device), lens, output_size=n)
        j = torch.arange(n, device=keys.device) - starts[segment]  # index inside its segment
        quantized_len = torch.where(lens >= residual, ((lens - residual) // group + 1) * group, 0)
        quantized = j < quantized_len[segment]
        self.quantized_index = quantized.nonzero().squeeze(1)
        self.residual_index = (~quantized).nonzero().squeeze(1)
        groups_before = torch.cumsum(quantized_len // group, 0) - quantized_len // group
        self.key_group = (groups_before[segment] + j // group)[self.quantized_index]  # (Nq,) group of each key
        count = int((quantized_len // group).sum())
        k, v = keys[self.quantized_index], values[self.quantized_index]
        # a key group is G consecutive tokens of one segment: its Nq keys in order are `count` blocks of G
        codes, self.key_scale, self.key_zero = _quantize(k.view(count, group, d), 1, bits)
        self.key_codes = pack(codes.view(-1, d), bits)
        self.key_scale, self.key_zero = self.key_scale.squeeze(1), self.key_zero.squeeze(1)
        self.values = quantize_values(v[None, None], bits, group)
        self.residual_keys, self.residual_values = keys[self.residual_index], values[self.residual_index]

    @property
    def nbytes(self) -> int:
        held = (self.key_codes, self.key_scale, self.key_zero, *self.values, self.residual_keys, self.residual_values)
        return sum(t.numel() * t.element_size() for t in held)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) (N, D) in the input dtype, packed as given."""
        keys = self.residual_keys.new_empty(self.shape)
        values = self.residual_values.new_empty(self.shape)
        codes = _unpack_as(self.key_codes, self.bits, self.key_scale.dtype)
        keys[self.quantized_index] = codes.mul_(self.key_scale[self.key_group]).add_(self.key_zero[self.key_group])
        values[self.quantized_index] = dequantize_values(self.values, self.bits)[0, 0]
        keys[self.residual_index], values[self.residual_index] = self.residual_keys, self.residual_values
        return keys, values
