"""ThinK as `method.key_channels=r` (arXiv:2407.21018; kvpress ThinKPress at commit 8bb29b9): the kept key
channels against loops over the window queries and the kept keys, the keys the attention reads against
kvpress's zeroing (its `compress` transcribed), after a full cache and after SnapKV's cut; MHA and GQA; the
bytes held; decoding and batching on tiny models."""

import pytest
import torch

from kvbench.engine import Budget, Session, install
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.models.families import tiny_model
from tests.helpers import assert_batched_equals_alone, one_layer_cache
from tests.unit.test_methods import random_inputs


def loop_kept(q, k, b, h, ratio, window):
    """Channels KV head h keeps: score_c = (group mean of the window queries' mean q_c^2) x mean k_c^2."""
    hq, n, d = q.shape[1], q.shape[2], k.shape[3]  # n: the prompt's queries (k: the kept keys)
    groups = hq // k.shape[1]
    scores = []
    for c in range(d):
        qs = sum(sum(float(q[b, g, i, c]) ** 2 for i in range(n - window, n)) / window
                 for g in range(h * groups, (h + 1) * groups)) / groups
        ks = sum(float(k[b, h, j, c]) ** 2 for j in range(k.shape[2])) / k.shape[2]
        scores.append(qs * ks)
    return sorted(sorted(range(d), key=lambda c: scores[c], reverse=True)[: d - int(d * ratio)])


def kvpress_zeroed(q, keys, ratio, window):
    """kvpress ThinKPress.compress on post-RoPE window queries: the keys with the pruned channels zeroed."""
    bsz, num_key_value_heads, k_len, head_dim = keys.shape
    groups = q.shape[1] // num_key_value_heads
    queries_norm = torch.pow(q[:, :, -window:], 2).mean(dim=2)
    queries_norm = queries_norm.view(bsz, num_key_value_heads, groups, head_dim).mean(2)
    key_scores = queries_norm * torch.pow(keys, 2).mean(dim=2)
    indices = key_scores.topk(int(head_dim * ratio), dim=-1, largest=False).indices
    return keys.clone().scatter_(-1, indices.unsqueeze(2).expand(-1, -1, k_len, -1), 0)


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("cfg", [{"name": "full"}, {"name": "snapkv", "window": 4}, {"name": "knorm"}],
                         ids=lambda c: c["name"])
def test_kept_channels_and_zeroed_keys_match_loops_and_kvpress(cfg, ratio, hkv):
    q, k, v, _ = random_inputs(hkv, 30, steps=0, seed=int(ratio * 8) + hkv)
    settings = {**cfg, "key_channels": ratio, "channel_window": 6}
    cache = one_layer_cache(settings, 16, q, k, v)
    plain = one_layer_cache(cfg, 16, q, k, v).layers[0]
    kept_keys = plain.view("keys") if plain.keys is not None else k  # the method's cut first
    store = cache.layers[0].store
    for b in range(2):
        for h in range(hkv):
            assert store.kept[b, h].tolist() == loop_kept(q, kept_keys, b, h, ratio, 6)
    assert torch.equal(store.keys(), kvpress_zeroed(q, kept_keys, ratio, 6))
    assert torch.equal(store.values(), plain.view("values") if plain.keys is not None else v)
    d = k.shape[-1]
    n = kept_keys.shape[2]
    expected = 2 * hkv * (n * (d - int(d * ratio)) * 4 + (d - int(d * ratio)) * 8 + n * d * 4)
    assert store.nbytes == expected and cache.kv_summary()["kv_kept_bytes"] == expected // 2


def test_decoding_appends_whole_keys_and_batches_equal_alone():
    from kvbench.engine import Budget, Session, install
    from kvbench.models.families import tiny_model

    model = tiny_model("llama", num_hidden_layers=2)
    install(model, "sdpa")
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    session = Session(model, build({"name": "snapkv", "window": 4, "key_channels": 0.5}), Budget(tokens=16), reserve=6)
    tokens = session.generate(ids, 6, []).tokens
    plain = Session(model, build({"name": "snapkv", "window": 4}), Budget(tokens=16), reserve=6)
    plain.generate(ids, 6, [])
    layer = session.cache.layers[0]
    assert layer.store.length == 16 + 5 and layer.store.prefix.shape[-1] == 8  # head dim 16, half pruned
    assert session.cache.kv_summary()["kv_kept_bytes"] < plain.cache.kv_summary()["kv_kept_bytes"]
    assert len(tokens[0]) == 6
    for settings in ({"name": "snapkv", "window": 4, "key_channels": 0.5}, {"name": "full", "key_channels": 0.25}):
        assert_batched_equals_alone(model, settings, 16)


def test_settings():
    assert build({"name": "snapkv", "key_channels": 0.5}).run_label == "snapkv-think0.5"
    for cfg, message in (({"name": "weightedkv", "stage": "decode"}, "merges values"),
                         ({"name": "full", "key_channels": 1.0}, r"in \[0, 1\)"),
                         ({"name": "full", "quant": "kivi2"}, "set one of them")):
        with pytest.raises(KVBenchError, match=message):
            build({"key_channels": 0.5, **cfg})


@pytest.mark.parametrize("cfg", [{"name": "h2o"}, {"name": "tova"}, {"name": "knorm", "stage": "decode"}],
                         ids=lambda c: c["name"])
@torch.inference_mode()
def test_decode_stage_eviction_from_pruned_keys(cfg):
    """Evicting from the pruned store while decoding: with no channel pruned (int(16 x 0.05) = 0) the plain
    method's tokens; with half pruned, each slot reads its position's key with the pruned channels zero."""
    model = tiny_model("llama", num_hidden_layers=2)
    install(model, "sdpa")
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(8))
    plain = Session(model, build(cfg), Budget(tokens=16), reserve=10)
    none = Session(model, build({**cfg, "key_channels": 0.05}), Budget(tokens=16), reserve=10)
    assert none.generate(ids, 10, []).tokens == plain.generate(ids, 10, []).tokens
    half = Session(model, build({**cfg, "key_channels": 0.5}), Budget(tokens=16), reserve=10)
    tokens = half.generate(ids, 10, []).tokens[0]
    truth = Session(model, build({"name": "full"}), reserve=10)
    truth.prefill(ids)
    for token in tokens[:-1]:
        truth.step(torch.tensor([[token]]))
    for layer, full in zip(half.cache.layers, truth.cache.layers):
        assert layer.length == layer.store.length == 16
        pos = layer.view("pos")
        true_keys = full.view("keys").gather(2, pos[..., None].expand(-1, -1, -1, 16))
        kept = torch.zeros(*pos.shape[:2], 16, dtype=torch.bool).scatter_(-1, layer.store.kept, True)
        prompt_token = (pos < ids.shape[1])[..., None]
        expected = torch.where(prompt_token & ~kept[:, :, None], torch.zeros_like(true_keys), true_keys)
        # layer 0's keys depend on the tokens alone; a later layer's decoded keys on the pruned layers below
        same_input = (pos < ids.shape[1]) if layer.layer_idx else torch.ones_like(pos, dtype=torch.bool)
        torch.testing.assert_close(layer.store.keys()[same_input], expected[same_input], rtol=0, atol=1e-6)


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("cfg", [{"name": "knorm", "heads": "ada"}, {"name": "ada_snapkv", "window": 4}],
                         ids=lambda c: c["name"])
def test_per_head_budgets_prune_each_segment_s_channels(cfg, hkv):
    """A ragged store (per-head budgets): each head's segment keeps the channels the loops choose from its own
    kept keys, and the attention reads the pruned ones as zero."""
    q, k, v, _ = random_inputs(hkv, 30, steps=0, seed=hkv)
    cache = one_layer_cache({**cfg, "key_channels": 0.5, "channel_window": 6}, 12, q, k, v)
    plain = one_layer_cache(cfg, 12, q, k, v).layers[0].ragged
    ragged = cache.layers[0].ragged
    keys, values = ragged.prefix()
    starts = plain.cu_lens.tolist()
    for b in range(2):
        for h in range(hkv):
            s = b * hkv + h
            segment = plain.prefix_keys[starts[s] : starts[s + 1]]
            kept = loop_kept(q, segment[None, None].expand(2, hkv, -1, -1), b, h, 0.5, 6)
            assert sorted(ragged.key_channels[s].tolist()) == kept
            expected = torch.zeros_like(segment)
            expected[:, kept] = segment[:, kept]
            assert torch.equal(keys[starts[s] : starts[s + 1]], expected)
    assert torch.equal(values, plain.prefix_values)
    assert cache.kv_summary()["kv_kept_bytes"] < sum(plain.lens.flatten().tolist()) * 2 * k.shape[-1] * 4


def test_per_head_budgets_with_no_channel_pruned_are_the_plain_method():
    model = tiny_model("llama", num_hidden_layers=2)
    install(model, "sdpa")
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(2))
    for cfg in ({"name": "knorm", "heads": "ada"}, {"name": "pyramidkv"}):
        plain = Session(model, build(cfg), Budget(tokens=16), reserve=6).generate(ids, 6, []).tokens
        none = Session(model, build({**cfg, "key_channels": 0.05}), Budget(tokens=16), reserve=6).generate(ids, 6, [])
        assert none.tokens == plain, cfg
    assert_batched_equals_alone(model, {"name": "knorm", "heads": "ada", "key_channels": 0.5}, 16)
