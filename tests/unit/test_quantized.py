"""KIVI-style quantization (kvbench.engine.quantized) against explicit Python loops: keys per channel over G
tokens, values per token over G channels, at 2 and 4 bits; packing; the residual rule over a run of appends;
`keep` leaving kept tokens unchanged; `nbytes` by hand; the scale/2 error bound; transformers' quanto backend."""

import pytest
import torch

from kvbench.engine.quantized import (
    QuantizedKV,
    dequantize_keys,
    dequantize_values,
    pack,
    quantize_keys,
    quantize_values,
    unpack,
)

BITS = [2, 4]


def ref_group(xs, bits):
    """One group, element by element in float32: zero = min, scale = (max - min) / (2^b - 1),
    code = clamp(round((x - zero) / scale)) (halves to even), x^ = code * scale + zero."""
    top = 2**bits - 1
    lo = hi = xs[0]
    for x in xs[1:]:
        lo, hi = torch.minimum(lo, x), torch.maximum(hi, x)
    scale = (hi - lo) / top
    codes = [0 if scale == 0 else min(max(int(torch.round((x - lo) / scale)), 0), top) for x in xs]
    return codes, [c * scale + lo for c in codes], scale


def ref_keys(k, bits, group):
    """(codes, dequantized) of keys (B, H, n, D): each channel of each head over `group` consecutive tokens."""
    b_, h_, n, d = k.shape
    codes, deq = torch.zeros(k.shape, dtype=torch.long), torch.zeros_like(k)
    for b in range(b_):
        for h in range(h_):
            for g in range(n // group):
                for c in range(d):
                    cs, xs, _ = ref_group(list(k[b, h, g * group : (g + 1) * group, c]), bits)
                    for i in range(group):
                        codes[b, h, g * group + i, c], deq[b, h, g * group + i, c] = cs[i], xs[i]
    return codes, deq


def ref_values(v, bits, group):
    """(codes, dequantized) of values (B, H, n, D): each token over `group` consecutive channels."""
    b_, h_, n, d = v.shape
    codes, deq = torch.zeros(v.shape, dtype=torch.long), torch.zeros_like(v)
    for b in range(b_):
        for h in range(h_):
            for t in range(n):
                for g in range(d // group):
                    cs, xs, _ = ref_group(list(v[b, h, t, g * group : (g + 1) * group]), bits)
                    for i in range(group):
                        codes[b, h, t, g * group + i], deq[b, h, t, g * group + i] = cs[i], xs[i]
    return codes, deq


def ref_pack(codes, bits):
    """Byte j of a row = sum_i code[j * k + i] << (bits * i), k = 8 // bits codes per byte."""
    per = 8 // bits
    rows = codes.reshape(-1, codes.shape[-1]).tolist()
    out = [[sum(row[j * per + i] << (bits * i) for i in range(per)) for j in range(len(row) // per)] for row in rows]
    return torch.tensor(out, dtype=torch.uint8).view(*codes.shape[:-1], -1)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", BITS)
def test_keys_match_loops(bits):
    k = randn(2, 2, 16, 8, seed=bits)
    q = quantize_keys(k, bits, group=8)
    codes, deq = ref_keys(k, bits, 8)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (2, 2, 16, 8 * bits // 8)
    assert q.scale.shape == q.zero.shape == (2, 2, 2, 8) and q.scale.dtype == k.dtype
    assert torch.equal(unpack(q.codes, bits).long(), codes)
    assert (dequantize_keys(q, bits) - deq).abs().max() <= 1e-6


@pytest.mark.parametrize("bits", BITS)
def test_values_match_loops(bits):
    v = randn(2, 2, 5, 16, seed=10 + bits)
    q = quantize_values(v, bits, group=8)
    codes, deq = ref_values(v, bits, 8)
    assert q.scale.shape == q.zero.shape == (2, 2, 5, 2)
    assert torch.equal(unpack(q.codes, bits).long(), codes)
    assert (dequantize_values(q, bits) - deq).abs().max() <= 1e-6


@pytest.mark.parametrize("bits", BITS)
def test_packing_matches_loops_and_round_trips(bits):
    codes = torch.randint(0, 2**bits, (3, 2, 5, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack(codes, bits)
    assert packed.shape == (3, 2, 5, 16 * bits // 8)
    assert torch.equal(packed, ref_pack(codes, bits))
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_error_within_half_a_step(bits, dtype):
    k, v = randn(1, 3, 64, 32, seed=2).to(dtype), randn(1, 3, 64, 32, seed=3).to(dtype) * 5
    slack = 1e-6 if dtype == torch.float32 else 1e-2  # fp16: the arithmetic's own rounding on top
    qk, qv = quantize_keys(k, bits, 16), quantize_values(v, bits, 16)
    key_step = qk.scale.repeat_interleave(16, dim=2).float()  # (B, H, n, D): each key's own scale
    value_step = qv.scale.repeat_interleave(16, dim=3).float()
    assert ((dequantize_keys(qk, bits).float() - k.float()).abs() <= key_step / 2 * (1 + slack) + slack).all()
    assert ((dequantize_values(qv, bits).float() - v.float()).abs() <= value_step / 2 * (1 + slack) + slack).all()


def test_constant_group_is_exact():
    k = torch.full((1, 1, 8, 8), 0.3)
    q = quantize_keys(k, 2, 8)
    assert torch.equal(q.scale, torch.zeros_like(q.scale)) and torch.equal(dequantize_keys(q, 2), k)
    assert torch.equal(dequantize_values(quantize_values(k, 2, 8), 2), k)


def residual_model(appends, residual, group):
    """(quantized, residual) token counts after each append, the rule read literally: new tokens join the
    residual; while it holds `residual` or more, its oldest `group` tokens are quantized."""
    q = r = 0
    counts = []
    for n in appends:
        r += n
        while r >= residual:
            q, r = q + group, r - group
        counts.append((q, r))
    return counts


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("prompt", [1, 31, 77])
def test_residual_rule_over_appends(bits, prompt):
    group, residual = 8, 32
    appends = [prompt] + [1] * 30 + [13] + [1] * 10
    k, v = randn(2, 2, sum(appends), 8, seed=prompt), randn(2, 2, sum(appends), 8, seed=prompt + 1)
    kv, start = QuantizedKV(bits, group, residual), 0
    for n, (nq, nr) in zip(appends, residual_model(appends, residual, group)):
        kv.append(k[:, :, start : start + n], v[:, :, start : start + n])
        start += n
        assert (kv.quantized_length, kv.residual_length, kv.length) == (nq, nr, start)
        assert nr < residual and (start < residual - group or nr >= residual - group)
    # contents: quantized groups at multiples of G from the first token, then the newest tokens as they came
    nq = kv.quantized_length
    want_k = torch.cat((ref_keys(k[:, :, :nq], bits, group)[1], k[:, :, nq:]), dim=2)
    want_v = torch.cat((ref_values(v[:, :, :nq], bits, group)[1], v[:, :, nq:]), dim=2)
    assert (kv.keys() - want_k).abs().max() <= 1e-6 and (kv.values() - want_v).abs().max() <= 1e-6
    assert torch.equal(kv.keys()[:, :, nq:], k[:, :, nq:]) and kv.keys().dtype == k.dtype


def gather(x, index):
    return x.gather(2, index[..., None].expand(-1, -1, -1, x.shape[-1]))


@pytest.mark.parametrize("bits", BITS)
def test_keep_leaves_kept_tokens_unchanged(bits):
    kv = QuantizedKV(bits, group=8, residual=32)
    kv.append(randn(2, 3, 70, 16, seed=5), randn(2, 3, 70, 16, seed=6))  # 40 quantized, 30 residual
    keys, values, before = kv.keys(), kv.values(), kv.nbytes
    g = torch.Generator().manual_seed(7)
    keep = torch.stack([torch.randperm(70, generator=g)[:25] for _ in range(6)]).view(2, 3, 25)  # any order
    keep[0, 0] = torch.arange(45, 70)  # this head keeps residual tokens only, and 5 quantized ones
    keep[0, 1] = torch.arange(25)  # this one quantized tokens only
    kv.keep(keep)
    kept = keep.sort(dim=-1).values
    assert kv.length == 25 and kv.nbytes < before
    assert torch.equal(kv.keys(), gather(keys, kept)) and torch.equal(kv.values(), gather(values, kept))
    # later appends quantize new groups and never touch the kept quantized tokens
    nq, kept_keys, kept_values = kv.quantized_length, kv.keys(), kv.values()
    for step in range(40):
        kv.append(randn(2, 3, 1, 16, seed=100 + step), randn(2, 3, 1, 16, seed=200 + step))
    assert kv.length == 65 and kv.residual_length < 32
    assert torch.equal(kv.keys()[:, :, :nq], kept_keys[:, :, :nq])
    assert torch.equal(kv.values()[:, :, :nq], kept_values[:, :, :nq])


def test_keep_frees_unused_key_groups():
    kv = QuantizedKV(2, group=8, residual=32)
    kv.append(randn(1, 2, 56, 16, seed=8), randn(1, 2, 56, 16, seed=9))  # groups 0..3 quantized, 24 residual
    keys = kv.keys()
    keep = torch.tensor([[[1, 3, 40, 50], [17, 30, 31, 55]]])  # head 0 uses group 0, head 1 groups 2 and 3
    kv.keep(keep)
    assert kv.k.scale.shape[2] == 2 and kv.key_index.tolist() == [[[0, 0], [0, 1]]]
    assert torch.equal(kv.keys(), gather(keys, keep))


def test_nbytes_by_hand():
    b, h, d, bits, group = 1, 2, 16, 2, 8
    kv = QuantizedKV(bits, group, residual=32)
    kv.append(randn(b, h, 100, d, seed=1), randn(b, h, 100, d, seed=2))
    nq, nr = 72, 28  # 100 tokens: 9 groups of 8 quantized, 28 < 32 left
    codes = b * h * nq * d * bits // 8  # uint8
    key_scales = 2 * b * h * (nq // group) * d * 4  # scale + zero per channel per group, float32
    value_scales = 2 * b * h * nq * (d // group) * 4  # scale + zero per token per channel group
    residual = 2 * b * h * nr * d * 4
    assert (kv.quantized_length, kv.residual_length) == (nq, nr)
    assert kv.nbytes == 2 * codes + key_scales + value_scales + residual == 12928
    kv.keep(torch.arange(100).expand(b, h, -1))  # keeps all: only the group index (int32) is added
    assert kv.nbytes == 12928 + b * h * nq * 4


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="2 or 4 bits"):
        QuantizedKV(bits=3)
    with pytest.raises(ValueError, match="multiple of the group"):
        QuantizedKV(group=32, residual=48)
    with pytest.raises(ValueError, match="groups of 8 tokens"):
        quantize_keys(randn(1, 1, 12, 8), 2, 8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_transformers_quanto_backend(bits, dtype):
    """transformers' QuantoQuantizedLayer with axis_key=-1 (keys per channel, G consecutive tokens) and
    axis_value=0 (values per token, G consecutive channels) is KIVI's grouping: the same numbers, bit for bit."""
    pytest.importorskip("optimum.quanto")
    from transformers.cache_utils import QuantoQuantizedLayer

    layer = QuantoQuantizedLayer(nbits=bits, axis_key=-1, axis_value=0, q_group_size=16)
    k, v = randn(2, 3, 48, 32, seed=11).to(dtype), randn(2, 3, 48, 32, seed=12).to(dtype)
    assert torch.equal(layer._dequantize(layer._quantize(k, axis=-1)), dequantize_keys(quantize_keys(k, bits, 16), bits))
    assert torch.equal(layer._dequantize(layer._quantize(v, axis=0)),
                       dequantize_values(quantize_values(v, bits, 16), bits))
