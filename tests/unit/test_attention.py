"""kvbench's attention function and statistics against naive attention written with explicit loops."""

import math

import pytest
import torch

from kvbench.engine.attention import (
    attention_column_sums,
    attention_window,
    eager_attention,
    kvbench_attention,
    visible_mask,
)
from tests.helpers import FakeModule


def naive_probs(query, key, scaling):
    """Explicit loops: probs[b, h, i, j] for query i (last q of kv), causal bottom-right."""
    b, hq, q, d = query.shape
    hkv, kv = key.shape[1], key.shape[2]
    group = hq // hkv
    out = torch.zeros(b, hq, q, kv, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(q):
                visible = kv - q + i + 1
                logits = [float(query[bi, h, i] @ key[bi, h // group, j]) * scaling for j in range(visible)]
                top = max(logits)
                exps = [math.exp(x - top) for x in logits]
                total = sum(exps)
                for j in range(visible):
                    out[bi, h, i, j] = exps[j] / total
    return out


def make_qkv(b=2, hq=4, hkv=2, q=6, kv=10, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, hq, q, d, generator=g)
    key = torch.randn(b, hkv, kv, d, generator=g)
    value = torch.randn(b, hkv, kv, d, generator=g)
    return query, key, value


@pytest.mark.parametrize("base", ["sdpa", "eager"])
@pytest.mark.parametrize("hkv", [4, 2])  # MHA and GQA
@pytest.mark.parametrize("q,kv", [(7, 7), (3, 10), (1, 9)])  # prefill, chunk after a prefix, decode
def test_attention_output_matches_naive(base, hkv, q, kv):
    query, key, value = make_qkv(hkv=hkv, q=q, kv=kv)
    scaling = 8**-0.5
    out, _ = kvbench_attention(FakeModule(base, groups=4 // hkv), query, key, value, None, scaling=scaling)
    probs = naive_probs(query, key, scaling)
    group = 4 // hkv
    expected = torch.einsum("bhqk,bhkd->bqhd", probs, value.double().repeat_interleave(group, dim=1))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_visible_mask_is_bottom_right_causal():
    mask = visible_mask(2, 5, "cpu")
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


@pytest.mark.parametrize("hkv", [4, 2])
@pytest.mark.parametrize("q,kv", [(9, 9), (4, 11)])
@pytest.mark.parametrize("block", [1, 3, None])
def test_column_sums_match_loops(hkv, q, kv, block):
    query, key, _ = make_qkv(hkv=hkv, q=q, kv=kv, seed=1)
    scaling = 8**-0.5
    probs = naive_probs(query, key, scaling)  # (b, hq, q, kv)
    b, hq = query.shape[:2]
    group = hq // hkv
    expected = torch.zeros(b, hkv, kv, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for j in range(kv):
                expected[bi, h // group, j] += sum(probs[bi, h, i, j] for i in range(q)) / group
    got = attention_column_sums(query, key, scaling, block=block)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_window_statistic_matches_loops():
    query, key, _ = make_qkv(q=8, kv=8, seed=2)
    scaling = 8**-0.5
    probs = naive_probs(query, key, scaling)
    expected = probs[:, :, -3:].mean(dim=2).view(2, 2, 2, 8).mean(dim=2)
    torch.testing.assert_close(attention_window(query, key, 3, scaling).double(), expected, atol=1e-6, rtol=1e-5)


def test_eager_returns_probabilities():
    query, key, value = make_qkv(q=5, kv=5)
    _, probs = eager_attention(FakeModule("eager"), query, key, value, None, scaling=8**-0.5)
    torch.testing.assert_close(probs.double(), naive_probs(query, key, 8**-0.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hkv", [4, 2])
@pytest.mark.parametrize("q,kv", [(9, 9), (4, 11)])
def test_column_sums_pass_also_gives_the_attention_output(hkv, q, kv):
    """H2O-style prompts take their output from the statistics' pass (no second attention pass)."""
    query, key, value = make_qkv(hkv=hkv, q=q, kv=kv, seed=4)
    scaling = 8**-0.5
    sums, out = attention_column_sums(query, key, scaling, block=2, value=value)
    expected = torch.einsum("bhqk,bhkd->bqhd", naive_probs(query, key, scaling),
                            value.double().repeat_interleave(4 // hkv, dim=1))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums, attention_column_sums(query, key, scaling, block=2))
