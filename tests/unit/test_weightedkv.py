"""WeightedKV against the paper's toy case and a brute-force reference of Algorithm 1 (explicit lists)."""

import math
from types import SimpleNamespace

import pytest
import torch

from kvbench.engine import Budget, CompressedCache
from kvbench.engine.attention import kvbench_attention
from kvbench.methods import build
from kvbench.methods.weightedkv import merged_value
from tests.helpers import SCALING, FakeModule, dot, softmax, token_lists
from tests.unit.test_methods import random_inputs


def test_paper_toy_merge():
    v2, v3 = torch.tensor([6.0, 0.0, 12.0]), torch.tensor([0.0, 6.0, -6.0])
    out = merged_value(v2[None], torch.tensor([0.1]), v3[None], torch.tensor([0.5]))[0]
    torch.testing.assert_close(out, v2 / 6 + 5 * v3 / 6)
    # both averages zero: the right neighbour is left as it is
    torch.testing.assert_close(merged_value(v2[None], torch.zeros(1), v3[None], torch.zeros(1))[0], v3)


class Algorithm1:
    """One list of tokens {pos, k, v, a, n} per (batch, kv head), the rule applied literally."""

    def __init__(self, q, k, v, budget, sinks):
        self.C, self.S = budget, min(sinks, budget)
        self.R = max(0, budget // 2 - self.S)
        self.heads = token_lists(self, q, k, v, a=0.0, n=0)
        n = self.seen
        for b in range(self.B):
            for h in range(self.Hkv):
                toks = self.heads[b, h]
                for g in range(h * self.G, (h + 1) * self.G):
                    for i in range(n):  # prompt: a_j = sum of attention, n_j = queries that see j
                        probs = softmax([dot(q[b, g, i].tolist(), t["k"]) * SCALING for t in toks[: i + 1]])
                        for t, p in zip(toks, probs):
                            t["a"] += p / self.G
                for t in toks:
                    t["n"] = n - t["pos"]
                self.shrink(toks)

    def abar(self, t):
        return t["a"] / t["n"]

    def shrink(self, toks):
        while len(toks) > self.C:
            free = [t for t in toks if not (t["pos"] < self.S or t["pos"] >= self.seen - self.R)]
            j = min(free, key=lambda t: (self.abar(t), t["pos"]))
            right = [t for t in toks if t["pos"] > j["pos"]]
            if right:
                r = min(right, key=lambda t: t["pos"])
                total = self.abar(j) + self.abar(r)
                if total > 0:
                    r["v"] = [(self.abar(j) * vj + self.abar(r) * vr) / total for vj, vr in zip(j["v"], r["v"])]
            toks.remove(j)

    def step(self, q1, k1, v1):
        pos = self.seen
        self.seen += 1
        for (b, h), toks in self.heads.items():
            toks.append({"pos": pos, "k": k1[b, h, 0].tolist(), "v": v1[b, h, 0].tolist(), "a": 0.0, "n": 0})
            row = [0.0] * len(toks)
            for g in range(h * self.G, (h + 1) * self.G):
                probs = softmax([dot(q1[b, g, 0].tolist(), t["k"]) * SCALING for t in toks])
                row = [x + p / self.G for x, p in zip(row, probs)]
            for t, x in zip(toks, row):
                t["a"] += x
                t["n"] += 1
            self.shrink(toks)


def check_same(cache, reference):
    layer = cache.layers[0]
    pos, values = layer.view("pos"), layer.values[:, :, : layer.length]
    for (b, h), toks in reference.heads.items():
        order = pos[b, h].argsort()
        assert pos[b, h][order].tolist() == [t["pos"] for t in sorted(toks, key=lambda t: t["pos"])]
        expected = torch.tensor([t["v"] for t in sorted(toks, key=lambda t: t["pos"])])
        torch.testing.assert_close(values[b, h][order], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("budget,sinks", [(16, 4), (12, 1)])
def test_engine_matches_algorithm_1_at_the_prompt_and_over_220_steps(hkv, budget, sinks):
    q, k, v, decode = random_inputs(hkv, n=30, steps=220, seed=11 + hkv + budget)
    cache = CompressedCache(
        SimpleNamespace(config=SimpleNamespace(num_hidden_layers=1)),
        build({"name": "weightedkv", "sinks": sinks}), Budget(tokens=budget),
    )
    module = FakeModule("sdpa", groups=4 // hkv)
    keys, values = cache.update(k, v, 0)
    kvbench_attention(module, q, keys, values, None, scaling=SCALING, kvbench_cache=cache)
    reference = Algorithm1(q, k, v, budget, sinks)
    check_same(cache, reference)
    cache.phase = "decode"
    for step, (q1, k1, v1) in enumerate(decode):
        keys, values = cache.update(k1, v1, 0)
        kvbench_attention(module, q1, keys, values, None, scaling=SCALING, kvbench_cache=cache)
        reference.step(q1, k1, v1)
        if step % 10 == 0 or step == len(decode) - 1:
            check_same(cache, reference)
    assert not math.isnan(float(cache.layers[0].values.sum()))


def test_layout_follows_the_paper():
    method = build({"name": "weightedkv"})
    assert method.allocate(Budget(tokens=1024), None) == (1024, 4, 508)
    assert method.allocate(Budget(tokens=256), None) == (256, 4, 124)


def one_by_one(values, abar, kept):
    """The prompt's merges literally: evict in ascending (ā, position), merge into the alive right neighbour."""
    alive = list(range(len(abar)))
    v = [list(map(float, row)) for row in values]
    for j in sorted(set(alive) - set(kept), key=lambda j: (abar[j], j)):
        i = alive.index(j)
        if i + 1 < len(alive):
            r = alive[i + 1]
            total = abar[j] + abar[r]
            if total > 0:
                v[r] = [(abar[j] * a + abar[r] * b) / total for a, b in zip(v[j], v[r])]
        alive.remove(j)
    return [v[r] for r in sorted(kept)]


@pytest.mark.parametrize("pattern", ["random", "ties-and-zeros", "rising", "falling"])
def test_prompt_merges_at_once_equal_the_one_by_one_rule(pattern):
    from kvbench.methods.weightedkv import replay_merges

    g = torch.Generator().manual_seed(3)
    n, budget, d = 300, 37, 5
    abar = {
        "random": torch.rand(2, 3, n, generator=g),
        "ties-and-zeros": torch.randint(0, 4, (2, 3, n), generator=g).float() / 4,  # many exact ties, zeros
        "rising": torch.linspace(0.1, 1, n).expand(2, 3, n).clone(),  # one long chain of merges
        "falling": torch.linspace(1, 0.1, n).expand(2, 3, n).clone(),  # every token into the next kept one
    }[pattern]
    values = torch.randn(2, 3, n, d, generator=g, dtype=torch.float64)
    # any kept set works; for "falling" the last token is kept, so every chain ends in a kept token
    last = pattern == "falling"
    keep = torch.stack([
        torch.cat([torch.randperm(n - last, generator=g)[: budget - last], torch.tensor([n - 1] * last, dtype=torch.long)])
        for _ in range(6)
    ]).view(2, 3, budget)
    out = replay_merges(values, abar, keep)
    for b in range(2):
        for h in range(3):
            kept = keep[b, h].tolist()
            expected = one_by_one(values[b, h].tolist(), abar[b, h].tolist(), kept)
            got = out[b, h, sorted(kept)].double()
            torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)
