"""SimLayerKV (arXiv:2410.13846; kvpress SimLayerKVPress at commit 8bb29b9): the lazy-layer test and the kept
tokens against a brute-force reference (naive softmax attention of the last queries, by loops) and against
kvpress's `compress` transcribed on the same attention weights; MHA and GQA; prefill and decode stage."""


import pytest
import torch

from kvbench.engine import Budget, CompressedCache
from kvbench.errors import KVBenchError
from kvbench.methods import build
from tests.helpers import SCALING, assert_batched_equals_alone, dot, one_layer_cache, softmax
from tests.unit.test_methods import engine_kept, random_inputs


def laziness(q, k, b, n_last):
    """Mean over query heads and the last n_last queries of their causal softmax attention, by loops; the
    last n_last keys left out (kvpress's window attention drops them)."""
    hq, n = q.shape[1], q.shape[2]
    groups = hq // k.shape[1]
    total = [0.0] * n
    for h in range(hq):
        for i in range(n - n_last, n):
            logits = [dot(q[b, h, i].tolist(), k[b, h // groups, j].tolist()) * SCALING for j in range(i + 1)]
            for j, a in enumerate(softmax(logits)):
                total[j] += a / (hq * n_last)
    return total[: n - n_last]


def reference(q, k, budget, threshold, n_initial=4, n_last=1):
    """Kept positions per (batch, head), and whether the layer was lazy, for each batch row."""
    n = q.shape[2]
    n_recent = budget - min(n_initial, budget) + n_last
    kept, lazy = [], []
    for b in range(q.shape[0]):
        a = laziness(q, k, b, n_last)
        score = sum(a[:n_initial]) + sum(a[-n_recent:])
        is_lazy = threshold < 1.0 and n > n_initial + n_recent + n_last and score > threshold
        positions = [j for j in range(n) if j < n_initial or j >= n - (n_recent - n_last)] if is_lazy else list(range(n))
        kept.append([positions] * k.shape[1])
        lazy.append(is_lazy)
    return kept, lazy


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("n_last", [1, 3])
def test_lazy_layers_match_brute_force(hkv, n_last):
    q, k, v, _ = random_inputs(hkv, 40, steps=0, seed=hkv + n_last)
    q, k, v = q[:1], k[:1], v[:1]  # one sequence per cache (batched runs keep one cache per sequence)
    a = laziness(q, k, 0, n_last)
    for budget in (12, 20):
        n_recent = budget - 4 + n_last
        score = sum(a[:4]) + sum(a[-n_recent:])
        for threshold in (score - 1e-3, score + 1e-3, 1.0, 0.0):
            cfg = {"name": "simlayerkv", "lazy_threshold": max(0.0, min(1.0, threshold)), "n_last": n_last}
            kept, lazy = reference(q, k, budget, cfg["lazy_threshold"], n_last=n_last)
            assert engine_kept(one_layer_cache(cfg, budget, q, k, v)) == kept, (budget, threshold)
            assert lazy[0] == (threshold == score - 1e-3 or threshold == 0.0)


def kvpress_compress(attn_weights, keys, lazy_threshold, n_recent, n_initial=4, n_last=1):
    """kvpress SimLayerKVPress.compress with `is_lazy` inlined, on attention weights (bsz, heads, n_last,
    k_len - n_last) as SnapKVPress.compute_window_attention returns them: the kept key positions."""
    k_len = keys.shape[2]
    positions = torch.arange(k_len)
    if lazy_threshold == 1.0 or k_len <= n_initial + n_recent + n_last:
        return positions.tolist()
    weights = attn_weights.mean((0, 1, 2))
    score = weights[:n_initial].sum() + weights[-n_recent:].sum()
    if score.item() > lazy_threshold:
        return torch.cat([positions[:n_initial], positions[-n_recent + n_last:]]).tolist()
    return positions.tolist()


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
def test_kept_tokens_match_kvpress_code(hkv):
    q, k, v, _ = random_inputs(hkv, 50, steps=0, seed=7)
    q, k, v = q[:1], k[:1], v[:1]
    groups = 4 // hkv
    logits = q[:, :, -1:] @ k.repeat_interleave(groups, dim=1).transpose(2, 3) * SCALING
    attn = logits.softmax(dim=-1)[..., :-1]
    for threshold in (0.05, 0.2, 0.4, 0.9):
        for budget in (10, 30, 47):
            expected = kvpress_compress(attn, k, threshold, n_recent=budget - 4 + 1)
            assert engine_kept(one_layer_cache({"name": "simlayerkv", "lazy_threshold": threshold}, budget, q, k, v)) == [[expected] * hkv]


def test_settings_and_label():
    assert build({"name": "simlayerkv"}).run_label == "simlayerkv"
    for bad, message in (({"lazy_threshold": 1.5}, r"in \[0, 1\]"), ({"n_last": 0}, "n_last"),
                         ({"sinks": 4}, "n_initial"), ({"heads": "ada"}, "does not"), ({"critical": True}, "critical=false")):
        with pytest.raises(KVBenchError, match=message):
            build({"name": "simlayerkv", **bad})


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_lazy_layers_on_tiny_models(family):
    """A model end to end: with threshold 0 every full-attention layer is lazy and holds the budget, with 1
    none is; at stage decode a lazy layer stays at the budget, the rest grows; batched equals alone."""
    from kvbench.engine import Session, install
    from kvbench.models.families import tiny_model

    model = tiny_model(family, num_hidden_layers=2)
    install(model, "sdpa")
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    full = [layer for layer in CompressedCache(model, build({"name": "full"})).layers if not layer.window]
    for threshold, stage, new in ((0.0, "prefill", 5), (0.0, "decode", 5), (1.0, "decode", 5)):
        session = Session(model, build({"name": "simlayerkv", "lazy_threshold": threshold, "stage": stage}),
                          Budget(tokens=16), reserve=new)
        session.generate(ids, new, [])
        for i in (layer.layer_idx for layer in full):
            layer = session.cache.layers[i]
            grown = new - 1  # the last new token is not forwarded
            expected = 16 if threshold == 0.0 and stage == "decode" else (16 if threshold == 0.0 else 48) + grown
            assert layer.length == expected, (threshold, stage)
            if threshold == 0.0:
                assert set(layer.view("pos")[0, 0].tolist()) >= {0, 1, 2, 3}
    for settings in ({"name": "simlayerkv", "lazy_threshold": 0.3}, {"name": "simlayerkv", "lazy_threshold": 0.3, "stage": "decode"}):
        assert_batched_equals_alone(model, settings, 16)


def test_a_layer_kept_whole_has_room_for_the_reserve():
    """A non-lazy layer is not cut, but gets the reserve at once (not a doubling at the first new token)."""
    from kvbench.engine import Budget, Session, install
    from kvbench.models.families import tiny_model

    model = tiny_model("llama", num_hidden_layers=2)
    install(model, "sdpa")
    session = Session(model, build({"name": "simlayerkv", "lazy_threshold": 1.0}), Budget(tokens=16), reserve=5)
    session.prefill(torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(0)))
    assert [(layer.length, layer.capacity) for layer in session.cache.layers] == [(48, 53)] * 2
