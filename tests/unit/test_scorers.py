"""Knorm, KeyDiff, LagKV and Random (issue 25) against brute-force references written from kvpress's
presses: explicit loops over tokens and channels, kept sets compared at the prompt cut and (for the methods
with a decode stage) at every decode step; MHA and GQA, fp32. Ties: the more recent token is kept."""

import math
from types import SimpleNamespace

import pytest
import torch

from kvbench.engine import Budget, CompressedCache
from kvbench.engine.attention import kvbench_attention
from kvbench.errors import KVBenchError
from kvbench.methods import build
from tests.helpers import SCALING, FakeModule
from tests.unit.test_methods import engine_kept, random_inputs


def l2(vec):
    return math.sqrt(sum(x * x for x in vec))


def knorm_scores(keys):
    return [-l2(k) for k in keys]


def keydiff_scores(keys):
    dim = len(keys[0])
    anchor = [sum(k[c] / l2(k) for k in keys) / len(keys) for c in range(dim)]
    return [-sum(a * b for a, b in zip(k, anchor)) / (l2(k) * l2(anchor)) for k in keys]


def std(xs):
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def lag_part(target, ref):
    """One partition's softmax of per-token std of min-max scaled channels (scaled by the next partition)."""
    dim = len(target[0])
    low = [min(r[c] for r in ref) for c in range(dim)]
    high = [max(r[c] for r in ref) for c in range(dim)]
    spread = [std([(x[c] - low[c]) / (high[c] - low[c]) for c in range(dim)]) for x in target]
    top = max(spread)
    exps = [math.exp(s - top) for s in spread]
    return [e / sum(exps) for e in exps]


def lagkv_scores(keys, values, n_sink, lag):
    n = len(keys)
    if n < n_sink + 2 * lag:
        return [1.0 if j < n_sink else (j - n_sink) / (n - n_sink) for j in range(n)]
    parts = (n - n_sink) // lag
    scores = [1.0] * n
    for p in range(parts - 1):
        lo = n_sink + p * lag
        span, nxt = range(lo, lo + lag), range(lo + lag, lo + 2 * lag)
        ks = lag_part([keys[j] for j in span], [keys[j] for j in nxt])
        vs = lag_part([values[j] for j in span], [values[j] for j in nxt])
        mixed = [(a + b) / 2 for a, b in zip(ks, vs)]
        for i, j in enumerate(span):  # rank inside the partition (0 = lowest) / lag
            scores[j] = sum(m < mixed[i] for m in mixed) / lag
    return scores


def top(scores, positions, budget):
    """The kept positions: highest score first, the more recent among equals."""
    order = sorted(zip(scores, positions), key=lambda sp: (sp[0], sp[1]), reverse=True)
    return sorted(p for _, p in order[:budget])


def engine_cache(cfg, budget, k, v, q, hkv):
    cache = CompressedCache(SimpleNamespace(config=SimpleNamespace(num_hidden_layers=1)), build(cfg),
                            Budget(tokens=budget))
    module = FakeModule("sdpa", groups=4 // hkv)
    keys, values = cache.update(k, v, 0)
    kvbench_attention(module, q, keys, values, None, scaling=SCALING, kvbench_cache=cache)
    return cache, module


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("name", ["knorm", "keydiff"])
def test_key_scorers_prefill_and_decode(name, hkv):
    score = {"knorm": knorm_scores, "keydiff": keydiff_scores}[name]
    budget, n = 16, 40
    q, k, v, decode = random_inputs(hkv, n, steps=30, seed=7)
    all_k = torch.cat([k] + [d[1] for d in decode], dim=2)

    def keys_of(b, h, positions):
        return [all_k[b, h, p].tolist() for p in positions]

    for stage in ("prefill", "decode"):
        cache, module = engine_cache({"name": name, "stage": stage}, budget, k, v, q, hkv)
        held = {(b, h): list(range(n)) for b in range(2) for h in range(hkv)}
        for key in held:
            held[key] = top(score(keys_of(*key, held[key])), held[key], budget)
        assert engine_kept(cache) == [[held[b, h] for h in range(hkv)] for b in range(2)]
        cache.phase = "decode"
        for step, (q1, k1, v1) in enumerate(decode):
            keys, values = cache.update(k1, v1, 0)
            kvbench_attention(module, q1, keys, values, None, scaling=SCALING, kvbench_cache=cache)
            for key in held:
                held[key] = held[key] + [n + step]
                if stage == "decode":  # the new token joins, the lowest score goes (the older among equals)
                    held[key] = top(score(keys_of(*key, held[key])), held[key], budget)
            assert engine_kept(cache) == [[held[b, h] for h in range(hkv)] for b in range(2)], f"{stage} {step}"


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize(("n", "lag", "budget"), [(70, 8, 30), (70, 8, 3), (20, 8, 10), (53, 16, 20)])
def test_lagkv_prefill(hkv, n, lag, budget):
    q, k, v, _ = random_inputs(hkv, n, steps=0, seed=n + lag)
    cache, _ = engine_cache({"name": "lagkv", "lag_size": lag}, budget, k, v, q, hkv)
    expected = [[top(lagkv_scores(k[b, h].tolist(), v[b, h].tolist(), 4, lag), list(range(n)), budget)
                 for h in range(hkv)] for b in range(2)]
    assert engine_kept(cache) == expected
    with pytest.raises(KVBenchError, match="method.stage=prefill"):
        build({"name": "lagkv", "stage": "decode"})


def test_random_is_seeded_and_each_decode_step_draws_anew():
    q, k, v, decode = random_inputs(2, 40, steps=20, seed=3)
    first, _ = engine_cache({"name": "random", "seed": 5}, 16, k, v, q, 2)
    again, _ = engine_cache({"name": "random", "seed": 5}, 16, k, v, q, 2)
    other, _ = engine_cache({"name": "random", "seed": 6}, 16, k, v, q, 2)
    draws = torch.rand(2, 2, 40, generator=torch.Generator().manual_seed(5)).tolist()
    expected = [[top(draws[b][h], list(range(40)), 16) for h in range(2)] for b in range(2)]
    assert engine_kept(first) == engine_kept(again) == expected != engine_kept(other)
    cache, module = engine_cache({"name": "random", "stage": "decode"}, 16, k, v, q, 2)
    cache.phase = "decode"
    newest_evicted = 0
    for step, (q1, k1, v1) in enumerate(decode):
        keys, values = cache.update(k1, v1, 0)
        kvbench_attention(module, q1, keys, values, None, scaling=SCALING, kvbench_cache=cache)
        newest_evicted += sum(40 + step not in head for row in engine_kept(cache) for head in row)
    assert newest_evicted < 20 * 4 / 2  # a fixed draw per slot would evict the newest token every step


def ada_reference(scores, budget, floor):
    """kvpress AdaKVPress on one sequence's scores [head][token], with loops: each head's top int(floor x C)
    are safe, the H x C largest (safe first) are kept; returns each head's kept positions."""
    heads, n = len(scores), len(scores[0])
    safe = int(budget * floor)
    ranked = []
    for h in range(heads):
        order = sorted(range(n), key=lambda j: (scores[h][j], j), reverse=True)
        for rank, j in enumerate(order):
            ranked.append((math.inf if rank < safe else scores[h][j], j, h))
    ranked.sort(reverse=True)
    counts = [0] * heads
    for _, _, h in ranked[: heads * budget]:
        counts[h] += 1
    return [top(scores[h], list(range(n)), counts[h]) for h in range(heads)]


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize(("name", "score", "floor"), [("knorm", knorm_scores, 0.2), ("keydiff", keydiff_scores, 0.5),
                                                      ("knorm", knorm_scores, 0.0)])
def test_heads_ada_shares_the_layer_budget_as_kvpress_adakv(name, score, floor, hkv):
    from tests.helpers import ragged_kept

    budget, n = 12, 40
    q, k, v, _ = random_inputs(hkv, n, steps=0, seed=11)
    cache, _ = engine_cache({"name": name, "heads": "ada", "ada_floor": floor}, budget, k, v, q, hkv)
    kept = ragged_kept(cache.layers[0])
    expected = [ada_reference([score(k[b, h].tolist()) for h in range(hkv)], budget, floor) for b in range(2)]
    assert kept == expected
    assert sum(len(head) for head in kept[0]) == hkv * budget  # the layer keeps H x C, shared unevenly
    assert len({len(head) for row in kept for head in row}) > 1
    assert build({"name": name, "heads": "ada"}).label == f"{name}-ada"


def test_heads_ada_keeps_protected_tokens_in_every_head():
    from tests.helpers import ragged_kept

    q, k, v, _ = random_inputs(2, 40, steps=0, seed=12)
    cache, _ = engine_cache({"name": "knorm", "heads": "ada", "sinks": 3}, 12, k, v, q, 2)
    assert all({0, 1, 2} <= set(head) for row in ragged_kept(cache.layers[0]) for head in row)
    with pytest.raises(KVBenchError, match="method=ada_snapkv"):
        build({"name": "snapkv", "heads": "ada"})
    with pytest.raises(KVBenchError, match="method.stage=prefill"):
        build({"name": "knorm", "heads": "ada", "stage": "decode"})
