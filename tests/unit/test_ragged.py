"""The ragged store's sparse attention (the CPU path and the GPU fallback) against naive per-head loops:
skewed heads, an empty head, one head per query head (G = 1), chunks of new queries, and bf16 on the CPU."""

import math

import pytest
import torch

from kvbench.engine.ragged import RaggedKV


def naive(query, heads, scaling):
    """heads[b][h] = (keys list, values list) visible to every new query i, plus the decoded tokens up to i."""
    b_, hq, q, d = query.shape
    kv_heads = len(heads[0])
    out = torch.zeros(b_, q, hq, d, dtype=torch.float64)
    for b in range(b_):
        for g in range(hq):
            keys, values, decoded = heads[b][g // (hq // kv_heads)]
            for i in range(q):
                visible_k = keys + [k for k, _ in decoded[: len(decoded) - q + i + 1]]
                visible_v = values + [v for _, v in decoded[: len(decoded) - q + i + 1]]
                logits = [sum(a * c for a, c in zip(query[b, g, i].tolist(), k)) * scaling for k in visible_k]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                for w, v in zip(weights, visible_v):
                    for j in range(d):
                        out[b, i, g, j] += w / sum(weights) * v[j]
    return out


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 4)], ids=["gqa", "one-head-per-query-head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_ragged_attention_matches_loops(hq, hkv, dtype):
    g = torch.Generator().manual_seed(hq + hkv)
    n, d = 30, 8
    keys = torch.randn(2, hkv, n, d, generator=g).to(dtype)
    values = torch.randn(2, hkv, n, d, generator=g).to(dtype)
    lens = torch.tensor([[29, 1, 0, 12][:hkv], [3, 30, 7, 0][:hkv]])  # skewed, with an empty head
    keep = torch.rand(2, hkv, n, generator=g).argsort(-1).argsort(-1) < lens[..., None]
    store = RaggedKV(keys, values, keep, torch.arange(n).expand(2, hkv, n), reserve=2)
    heads = [[([keys[b, h, j].double().tolist() for j in range(n) if keep[b, h, j]],
               [values[b, h, j].double().tolist() for j in range(n) if keep[b, h, j]], [])
              for h in range(hkv)] for b in range(2)]
    for width in (1, 3, 1):
        k1 = torch.randn(2, hkv, width, d, generator=g).to(dtype)
        v1 = torch.randn(2, hkv, width, d, generator=g).to(dtype)
        store.append(k1, v1)
        for b in range(2):
            for h in range(hkv):
                heads[b][h][2].extend((k1[b, h, i].double().tolist(), v1[b, h, i].double().tolist())
                                      for i in range(width))
        query = torch.randn(2, hq, width, d, generator=g).to(dtype)
        out = store.attention(query, d**-0.5)
        assert out.dtype == dtype and out.shape == (2, width, hq, d)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double(), naive(query.double(), heads, d**-0.5), atol=tol, rtol=tol)
    assert store.prefix_keys.shape == (int(lens.sum()), d)  # packed: nothing padded
