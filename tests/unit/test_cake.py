"""CAKE (antgroup/cakekv at commit c4675ce): layer preferences, token scores, budgets and the cascade of cuts
against the reference code's steps transcribed in torch/numpy (modify_llama.py's prefill branch,
CakeprefillKVCache.__call__ / evcit_layer_kvcache, utils.adjust_budgets), on a stack of layers with random
queries and keys; MHA and GQA, cascading and not; the decode stage and batching on tiny models."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvbench.engine import Budget, CompressedCache
from kvbench.engine.attention import kvbench_attention
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.methods.cake import adjust_budgets
from tests.helpers import SCALING, FakeModule, assert_batched_equals_alone


def reference_adjust(budget_list, total_budget, seq_len):
    """cake/utils.py adjust_budgets, step by step in numpy."""
    budget_list = np.array(budget_list, dtype=int)
    excess = np.maximum(budget_list - seq_len, 0)
    budget_list = np.minimum(budget_list, seq_len)
    total_excess = np.sum(excess)
    if total_excess > 0:
        valid = budget_list < seq_len
        if np.sum(valid) > 0:
            budget_list[valid] += total_excess // np.sum(valid)
            budget_list[np.where(valid)[0][: total_excess % np.sum(valid)]] += 1
    diff = total_budget - np.sum(budget_list)
    if diff != 0:
        valid = budget_list < seq_len if diff > 0 else budget_list > 1
        count = np.sum(valid)
        if count > 0:
            step, rest = abs(diff) // count, abs(diff) % count
            sign = 1 if diff > 0 else -1
            budget_list[valid] += sign * step
            budget_list[np.where(valid)[0][:rest]] += sign
    return budget_list.tolist()


@pytest.mark.parametrize("seed", range(6))
def test_adjust_budgets_is_the_reference(seed):
    rng = np.random.default_rng(seed)
    layers, cap = int(rng.integers(2, 9)), int(rng.integers(5, 60))
    total = int(rng.integers(layers, layers * cap))
    shares = (rng.dirichlet(np.ones(layers) * rng.uniform(0.2, 3)) * total).tolist()
    assert adjust_budgets(shares, total, cap) == reference_adjust(shares, total, cap)


def layer_inputs(layers, hkv, n, seed):
    g = torch.Generator().manual_seed(seed)
    # sharper attention in later layers: the layers' preferences differ
    return [(torch.randn(1, 4, n, 8, generator=g) * (0.3 + layer), torch.randn(1, hkv, n, 8, generator=g) * 2,
             torch.randn(1, hkv, n, 8, generator=g)) for layer in range(layers)]


def reference_kept(inputs, C, W, tau1, tau2, gamma, cascading):
    """Kept positions [layer][head] by the reference's prefill steps and cascade."""
    L, n = len(inputs), inputs[0][1].shape[2]
    hkv = inputs[0][1].shape[1]
    if n <= C + W:
        return [[list(range(n))] * hkv] * L
    total = (C - W) * L
    prefs, scores, kept = [], [], []
    for layer, (q, k, _) in enumerate(inputs):
        groups = q.shape[1] // hkv
        weights = q[..., -W:, :] @ k.repeat_interleave(groups, dim=1).transpose(2, 3) * SCALING
        mask = torch.full((W, W), torch.finfo(weights.dtype).min)
        cond = torch.arange(W)
        mask.masked_fill_(cond < (cond + 1).view(W, 1), 0)
        weights[..., -W:] += mask
        weights = torch.softmax(weights, dim=-1, dtype=torch.float32)
        part = weights[..., :-W]
        disp = -torch.sum(part * torch.log(part + 1e-10))
        var = torch.var(part, dim=-2).sum(0).sum(0).sum(0)
        prefs.append((disp ** (1 / tau1) * var ** (1 / tau2)).numpy())
        cache = weights.mean(dim=-2) + gamma * weights.var(dim=-2)
        cache = F.avg_pool1d(cache[..., :-W], kernel_size=5, padding=2, stride=1)
        scores.append(cache.reshape(1, hkv, groups, -1).mean(dim=-2))
        kept.append(torch.arange(n - W).expand(1, hkv, -1))
        if not cascading and layer < L - 1:
            continue
        budgets = reference_adjust([p / sum(prefs) * total for p in prefs], total, n - W)
        for i, budget in enumerate(budgets):
            budget = min(budget, n - W, scores[i].shape[-1])
            idx = scores[i].topk(budget, dim=-1).indices
            scores[i], kept[i] = scores[i].gather(2, idx), kept[i].gather(2, idx)
    window = list(range(n - W, n))
    return [[sorted(kept[i][0, h].tolist()) + window for h in range(hkv)] for i in range(L)]


def run(cfg, budget, inputs):
    cache = CompressedCache(SimpleNamespace(config=SimpleNamespace(num_hidden_layers=len(inputs))), build(cfg),
                            Budget(tokens=budget))
    for layer, (q, k, v) in enumerate(inputs):
        keys, values = cache.update(k, v, layer)
        kvbench_attention(FakeModule("sdpa", layer_idx=layer, groups=q.shape[1] // k.shape[1]), q, keys, values,
                          None, scaling=SCALING, kvbench_cache=cache)
    return cache


def kept(cache):
    return [[sorted(row) for row in layer.view("pos")[0].tolist()] for layer in cache.layers]


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("cascading", [True, False])
@pytest.mark.parametrize(("budget", "taus"), [(14, (1.0, 1.0)), (20, (1.6, 0.4)), (11, (0.5, 2.0)), (40, (1.0, 1.0))])
def test_cascade_matches_the_reference(hkv, cascading, budget, taus):
    inputs = layer_inputs(4, hkv, 48, seed=budget + hkv)
    cfg = {"name": "cake", "window": 6, "tau1": taus[0], "tau2": taus[1], "cascading": cascading}
    expected = reference_kept(inputs, budget, 6, *taus, 200.0, cascading)
    cache = run(cfg, budget, inputs)
    assert kept(cache) == expected
    lengths = [len(layer[0]) for layer in expected]
    if 48 > budget + 6:
        assert len(set(lengths)) > 1  # the layers' budgets differ
        assert sum(lengths) <= budget * 4  # the model's total at most (a layer capped at the prompt gives back)


def test_settings():
    assert build({"name": "cake"}).run_label == "cake"
    for bad, message in (({"window": 0}, "window"), ({"kernel": 4}, "odd"), ({"tau1": 0}, "tau1"),
                         ({"sinks": 4}, "sinks=0"), ({"heads": "ada"}, "does not"), ({"critical": True}, "critical=false")):
        with pytest.raises(KVBenchError, match=message):
            build({"name": "cake", **bad})
    assert build({"name": "cake"}).allocate(Budget(tokens=16), 100) == (16, 0, 15)  # the window shrinks to C - 1
    assert build({"name": "cake"}).allocate(Budget(tokens=16), 31) == (None, 0, 0)  # at most C + w: left alone


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cake_on_tiny_models(family):
    """A model end to end: the decode stage holds each layer at its budget, the layers' budgets sum to the
    model's total, a short prompt is left alone at stage prefill; batched equals alone."""
    from kvbench.engine import Session, install
    from kvbench.models.families import tiny_model

    model = tiny_model(family, num_hidden_layers=3)
    install(model, "sdpa")
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    for stage in ("prefill", "decode"):
        session = Session(model, build({"name": "cake", "window": 4, "stage": stage}), Budget(tokens=12), reserve=6)
        session.generate(ids, 6, [])
        for layer in session.cache.layers:
            if stage == "decode":
                assert layer.length <= layer.allocation[0], layer.layer_idx
    short = Session(model, build({"name": "cake", "window": 4}), Budget(tokens=12), reserve=2)
    short.prefill(ids[:, :16])
    assert all(layer.length == 16 - (0 if not layer.window else max(0, 16 - layer.window + 1))
               for layer in short.cache.layers)
    for settings in ({"name": "cake", "window": 4}, {"name": "cake", "window": 4, "stage": "decode"}):
        assert_batched_equals_alone(model, settings, 12)


def test_a_sliding_layer_cut_again_masks_by_positions():
    """The cascade's second cut of a sliding layer (Gemma 2) leaves gaps in its positions: its decode steps must
    then mask by position (`gaps`), or a kept token that left the window would still be seen."""
    from kvbench.engine import Session, install
    from kvbench.models.families import tiny_model

    model = tiny_model("gemma2", num_hidden_layers=3)
    install(model, "sdpa")
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    checked = 0
    for settings, budget in (({"name": "cake", "window": 4}, 8), ({"name": "knorm", "layers": "cake", "cake_window": 4}, 6)):
        session = Session(model, build(settings), Budget(tokens=budget), reserve=2)
        session.prefill(ids)
        for layer in session.cache.layers:
            if layer.window:  # its own cut kept the window's tokens (a budget above them); the second cut did not
                pos = layer.view("pos")[0, 0].sort().values
                if not torch.equal(pos, torch.arange(layer.seen - layer.length, layer.seen)):
                    assert layer.gaps, (settings, layer.layer_idx)
                    checked += 1
    assert checked >= 2
