"""`method.layers=pyramid`: PyramidKV's layer budgets for any scorer with a plain top-k cut. On a stack of
layers with random inputs, each layer keeps exactly what the method keeps alone at that layer's budget
(the schedule by hand: protected tokens + pyramid_cap), MHA and GQA, with and without Ada-KV heads."""

from types import SimpleNamespace

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
