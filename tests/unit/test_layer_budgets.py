"""`method.layers=pyramid` / `cake`: PyramidKV's or CAKE's layer budgets for any scorer with a plain top-k cut.
On a stack of layers with random inputs, each layer keeps exactly what the method keeps alone at that layer's
budget, MHA and GQA: for pyramid the schedule by hand (protected tokens + pyramid_cap), with and without Ada-KV
heads; for cake each layer's preference from its window attention and the cascade of the reference's
adjust_budgets, written out with loops in numpy (a layer ends at the smallest budget the cascade gave it)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvbench.engine import Budget, CompressedCache
from kvbench.engine.attention import kvbench_attention
from kvbench.errors import KVBenchError
from kvbench.methods import build
from tests.helpers import SCALING, FakeModule, ragged_kept


def stack(layers, hkv, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 4, n, 8, generator=g), torch.randn(1, hkv, n, 8, generator=g),
             torch.randn(1, hkv, n, 8, generator=g)) for _ in range(layers)]


def kept_sets(cfg, budgets, inputs):
    """Kept positions per layer and head; `budgets` one per layer, or one cache budget for every layer."""
    out = []
    for layer, (q, k, v) in enumerate(inputs):
        single = isinstance(budgets, list)
        if single and budgets[layer] == 0:  # the schedule's last layers may keep nothing (lo = per // beta)
            out.append([[]] * k.shape[1])
            continue
        cache = CompressedCache(SimpleNamespace(config=SimpleNamespace(num_hidden_layers=1 if single else len(inputs))),
                                build(cfg), Budget(tokens=budgets[layer] if single else budgets))
        index = 0 if single else layer
        if not single:  # the whole stack through one cache: run it once, read every layer
            for i, (qi, ki, vi) in enumerate(inputs):
                keys, values = cache.update(ki, vi, i)
                kvbench_attention(FakeModule("sdpa", layer_idx=i, groups=4 // ki.shape[1]), qi, keys, values, None,
                                  scaling=SCALING, kvbench_cache=cache)
            return [read(layer) for layer in cache.layers]
        keys, values = cache.update(k, v, index)
        kvbench_attention(FakeModule("sdpa", layer_idx=index, groups=4 // k.shape[1]), q, keys, values, None,
                          scaling=SCALING, kvbench_cache=cache)
        out.append(read(cache.layers[0]))
    return out


def read(layer):
    if layer.ragged is not None:
        return [sorted(h) for h in ragged_kept(layer)[0]]
    return [sorted(h) for h in layer.view("pos")[0].tolist()]


def by_hand(layer, layers, per, prefix, beta=20):
    """PyramidKV's schedule, written out: lo = per // beta, hi = 2 per - lo (at most the prefix), equal steps."""
    lo, hi = per // beta, 2 * per - per // beta
    if hi >= prefix:
        hi, lo = prefix, 2 * per - prefix
    return hi - layer * ((hi - lo) // (layers - 1))


CASES = [({"name": "knorm"}, 0), ({"name": "knorm", "sinks": 2}, 2), ({"name": "snapkv", "window": 4}, 4),
         ({"name": "tova", "stage": "prefill"}, 0), ({"name": "knorm", "heads": "ada"}, 0)]


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("budget", [12, 20, 30])
@pytest.mark.parametrize(("cfg", "protected"), CASES, ids=lambda c: "-".join(map(str, c.values())) if isinstance(c, dict) else str(c))
def test_each_layer_keeps_the_method_s_cut_at_its_pyramid_budget(cfg, protected, budget, hkv):
    n, layers = 40, 4
    inputs = stack(layers, hkv, n, seed=budget + hkv)
    budgets = [by_hand(layer, layers, budget - protected, n - protected) + protected for layer in range(layers)]
    assert kept_sets({**cfg, "layers": "pyramid"}, budget, inputs) == kept_sets(cfg, budgets, inputs)
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]


def test_budget_above_the_prompt_and_labels():
    inputs = stack(3, 2, 24, seed=0)
    assert kept_sets({"name": "knorm", "layers": "pyramid"}, 30, inputs) == [[list(range(24))] * 2] * 3
    assert build({"name": "knorm", "layers": "pyramid"}).run_label == "knorm-pyramid"
    assert build({"name": "knorm", "heads": "ada", "layers": "pyramid"}).run_label == "knorm-ada-pyramid"
    for cfg, message in (({"name": "pyramidkv"}, "sets its own"), ({"name": "streamingllm"}, "sets its own"),
                         ({"name": "cake"}, "sets its own"), ({"name": "knorm", "stage": "decode"}, "stage=prefill"),
                         ({"name": "knorm", "layers": "steps"}, "is not one of"),
                         ({"name": "knorm", "pyramid_beta": 0}, "must be >= 1")):
        with pytest.raises(KVBenchError, match=message):
            build({"layers": "pyramid", **cfg})


# -- layers: cake


def cake_stack(layers, hkv, n, seed):
    """Sharper attention in later layers, so the layers' preferences (and budgets) differ."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 4, n, 8, generator=g) * (0.3 + layer), torch.randn(1, hkv, n, 8, generator=g) * 2,
             torch.randn(1, hkv, n, 8, generator=g)) for layer in range(layers)]


def preference_by_hand(q, k, w, tau1, tau2):
    """CAKE's pref = H^(1/tau1) V^(1/tau2): per query head, the causal softmax rows of the last w queries on
    the n - w keys before them; H = -sum A log(A + 1e-10), V = sum over keys of the unbiased variance over rows."""
    q, k = q[0].double().numpy(), k[0].double().numpy()
    heads, n, _ = q.shape
    groups = heads // k.shape[0]
    dispersion = variance = 0.0
    for h in range(heads):
        rows = []
        for i in range(n - w, n):
            logits = np.array([q[h, i] @ k[h // groups, j] * SCALING for j in range(i + 1)])
            probs = np.exp(logits - logits.max())
            rows.append((probs / probs.sum())[: n - w])
        rows = np.array(rows)
        dispersion -= float((rows * np.log(rows + 1e-10)).sum())
        variance += float(((rows - rows.mean(axis=0)) ** 2).sum() / (w - 1))
    return dispersion ** (1 / tau1) * variance ** (1 / tau2)


def adjust_by_hand(shares, total, cap):
    """cake/utils.py adjust_budgets (antgroup/cakekv c4675ce) with explicit loops."""
    budgets = [int(s) for s in shares]
    excess = sum(max(b - cap, 0) for b in budgets)
    budgets = [min(b, cap) for b in budgets]
    under = [i for i, b in enumerate(budgets) if b < cap]
    if excess > 0 and under:
        for rank, i in enumerate(under):
            budgets[i] += excess // len(under) + (1 if rank < excess % len(under) else 0)
    diff = total - sum(budgets)
    if diff != 0:
        valid = [i for i, b in enumerate(budgets) if (b < cap if diff > 0 else b > 1)]
        sign = 1 if diff > 0 else -1
        for rank, i in enumerate(valid):
            budgets[i] += sign * (abs(diff) // len(valid) + (1 if rank < abs(diff) % len(valid) else 0))
    return budgets


def cake_by_hand(inputs, budget, protected, w, tau1=1.0, tau2=1.0):
    """Each layer's final budget and the one of its own cut: at layer l's cut the layers 0..l share
    (C - protected) x layers by preference (at most n - protected each); a layer ends at the smallest budget
    (+ protected) it was given."""
    layers, n = len(inputs), inputs[0][1].shape[2]
    prefs = [preference_by_hand(q, k, w, tau1, tau2) for q, k, _ in inputs]
    total, final, own = (budget - protected) * layers, [n] * layers, []
    for step in range(layers):
        seen = prefs[: step + 1]
        for i, b in enumerate(adjust_by_hand([p / sum(seen) * total for p in seen], total, n - protected)):
            final[i] = min(final[i], b + protected)
        own.append(min(final[step], n))
    return final, own


CAKE_CASES = [({"name": "knorm"}, 0), ({"name": "knorm", "sinks": 2}, 2), ({"name": "snapkv", "window": 4}, 4),
              ({"name": "tova", "stage": "prefill"}, 0)]


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize(("budget", "taus"), [(10, (1.0, 1.0)), (16, (1.6, 0.4)), (24, (0.5, 2.0))])
@pytest.mark.parametrize(("cfg", "protected"), CAKE_CASES, ids=lambda c: "-".join(map(str, c.values())) if isinstance(c, dict) else str(c))
def test_each_layer_keeps_the_method_s_cut_at_its_cake_budget(cfg, protected, budget, taus, hkv):
    n, layers, w = 40, 4, 8
    inputs = cake_stack(layers, hkv, n, seed=budget + hkv)
    budgets, own = cake_by_hand(inputs, budget, protected, w, *taus)
    settings = {**cfg, "layers": "cake", "cake_window": w, "tau1": taus[0], "tau2": taus[1]}
    assert kept_sets(settings, budget, inputs) == kept_sets(cfg, budgets, inputs)
    assert len(set(budgets)) > 1 and sum(budgets) <= budget * layers
    assert budgets[0] < own[0]  # the cascade cut the first layer again


def test_cake_layers_settings_and_memory():
    inputs = cake_stack(3, 2, 24, seed=0)
    assert kept_sets({"name": "knorm", "layers": "cake"}, 30, inputs) == [[list(range(24))] * 2] * 3
    assert kept_sets({"name": "knorm", "layers": "cake"}, 24, inputs) == [[list(range(24))] * 2] * 3
    # the scores kept for the cascade are dropped once the last layer is cut
    cache = CompressedCache(SimpleNamespace(config=SimpleNamespace(num_hidden_layers=4)),
                            build({"name": "snapkv", "window": 4, "layers": "cake", "cake_window": 8}), Budget(tokens=12))
    for i, (q, k, v) in enumerate(cake_stack(4, 2, 40, seed=1)):
        keys, values = cache.update(k, v, i)
        kvbench_attention(FakeModule("sdpa", layer_idx=i, groups=2), q, keys, values, None, scaling=SCALING,
                          kvbench_cache=cache)
        assert ("cut_scores" in cache.layers[0].notes) == (i < 3)
    assert [sorted(layer.notes) for layer in cache.layers] == [["preference"]] * 4
    assert build({"name": "knorm", "layers": "cake"}).run_label == "knorm-cake"
    assert build({"name": "snapkv", "layers": "cake"}).statistics("prefill").window_probs == 32
    assert build({"name": "snapkv", "layers": "cake"}).statistics("decode").window_probs == 0
    for cfg, message in (({"name": "pyramidkv"}, "sets its own"), ({"name": "cake"}, "sets its own"),
                         ({"name": "knorm", "stage": "decode"}, "stage=prefill"),
                         ({"name": "knorm", "heads": "ada"}, "heads=equal"), ({"name": "knorm", "chunk": 4}, "chunk=0"),
                         ({"name": "snapkv", "critical": True}, "critical=false"),
                         ({"name": "knorm", "quant": "kivi2"}, "quant=none"),
                         ({"name": "knorm", "key_channels": 0.5}, "key_channels=0"),
                         ({"name": "knorm", "tau1": 0}, "must be > 0"), ({"name": "knorm", "cake_window": 1}, ">= 2")):
        with pytest.raises(KVBenchError, match=message) as error:
            build({"layers": "cake", **cfg})
        assert "\n" not in str(error.value)
    for bad in ({"quant": "kivi2"}, {"key_channels": 0.5}):  # CAKE's own cascade cannot cut a compact store again
        with pytest.raises(KVBenchError, match="CAKE's cascade"):
            build({"name": "cake", **bad})
