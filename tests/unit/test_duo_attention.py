"""DuoAttention: pattern files, the streaming-head choice against kvpress's rule, kept sets and decode
attention against explicit loops (MHA and GQA), the budget's meaning, and the tiny model end to end."""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvbench.engine import Budget, CompressedCache, Session
from kvbench.engine.attention import kvbench_attention
from kvbench.engine.batch import Request, decode_together
from kvbench.engine.types import ModelShape
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.methods.duo_attention import load_patterns, streaming_count, streaming_heads
from tests.helpers import SCALING, D, FakeModule, dot, ragged_kept, softmax

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "duo_attention" / "tiny"  # 2 layers x 2 KV heads


def pattern_dir(tmp_path, alpha, sink=2, recent=4):
    folder = tmp_path / "patterns"
    folder.mkdir(exist_ok=True)
    np.savetxt(folder / "full_attention_heads.tsv", np.asarray(alpha, dtype=float), delimiter="\t")
    (folder / "config.json").write_text(f'{{"sink_size": {sink}, "recent_size": {recent}}}')
    return folder


# ----------------------------------------------------------------------------- pattern files


def test_published_format_loads_clipped_with_its_config(tmp_path):
    # the published .tsv: np.savetxt's "%.18e", tab-separated, a row per layer; values may leave [0, 1]
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "full_attention_heads.tsv").write_text(
        "6.054687500000000000e-01\t-1.000000000000000000e-02\t1.5e+00\n0.0\t9.921875e-01\t4.375e-01\n")
    (folder / "config.json").write_text('{"sink_size": 128, "recent_size": 256, "threshold": 0.5}')
    alpha, config = load_patterns(folder)
    assert alpha.tolist() == [[0.60546875, 0.0, 1.0], [0.0, 0.9921875, 0.4375]]  # np.clip(., 0, 1) as kvpress
    assert (config["sink_size"], config["recent_size"]) == (128, 256)
    assert load_patterns(folder / "full_attention_heads.tsv")[0].tolist() == alpha.tolist()  # the .tsv itself
    method = build({"name": "duo_attention", "patterns": str(folder)})
    assert (method.sink_size, method.recent_size) == (128, 256)
    # one layer (a single row) stays 2-D
    (folder / "full_attention_heads.tsv").write_text("0.5\t0.25\n")
    assert load_patterns(folder)[0].shape == (1, 2)


def test_missing_and_bad_files_are_one_line(tmp_path):
    with pytest.raises(KVBenchError, match=r"pattern file .*none.*not found: copy full_attention_heads.tsv .*"
                                           r"mit-han-lab/duo-attention"):
        build({"name": "duo_attention", "patterns": str(tmp_path / "none")})
    with pytest.raises(KVBenchError, match="method.patterns=PATH"):
        build({"name": "duo_attention"})
    bad = tmp_path / "bad.tsv"
    bad.write_text("0.5\tabc\n")
    with pytest.raises(KVBenchError, match="not a tab-separated table"):
        build({"name": "duo_attention", "patterns": str(bad)})
    lone = tmp_path / "lone" / "full_attention_heads.tsv"  # no config.json beside it
    lone.parent.mkdir()
    lone.write_text("0.5\t0.25\n")
    with pytest.raises(KVBenchError, match="set method.sink_size=N"):
        build({"name": "duo_attention", "patterns": str(lone)})
    method = build({"name": "duo_attention", "patterns": str(lone), "sink_size": 1, "recent_size": 3})
    assert method.window == 4


def test_settings_are_checked():
    base = {"name": "duo_attention", "patterns": str(FIXTURE)}
    for extra, message in [({"stage": "decode"}, "prompt only"), ({"positions": "shifted"}, "positions=original"),
                           ({"sinks": 4}, "method.sink_size"), ({"head_compression_ratio": 1.5}, r"\[0, 1\]"),
                           ({"heads": "ada"}, "heads=ada"), ({"gqa": "expand"}, "gqa=kv"),
                           ({"recent_size": -1}, ">= 0")]:
        with pytest.raises(KVBenchError, match=message):
            build({**base, **extra})
    assert build(base).label == "duo_attention"
    assert build({**base, "head_compression_ratio": 0.5}).label == "duo_attention-hcr0.5"


def test_patterns_for_another_model_are_one_line():
    method = build({"name": "duo_attention", "patterns": str(FIXTURE)})
    method.check_model(ModelShape(2, 4, 2))
    with pytest.raises(KVBenchError, match=r"cover 2 layers x 2 KV heads but the model has 30 x 3"):
        method.check_model(ModelShape(30, 9, 3))


# ----------------------------------------------------------------------------- which heads stream


def kvpress_mask(alpha, ratio):
    """kvpress DuoAttentionPress.post_init_from_model, as written there."""
    n_pruned = round(alpha.size * ratio)
    mask = np.zeros(alpha.shape, dtype=bool)
    if n_pruned > 0:
        indices = np.argsort(alpha, axis=None)[:n_pruned]
        mask[np.unravel_index(indices, alpha.shape)] = True
    return mask


@pytest.mark.parametrize("shape", [(4, 4), (6, 2), (32, 8)], ids=["mha", "gqa", "llama3"])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
def test_streaming_heads_are_kvpress_choice(tmp_path, shape, ratio):
    alpha = np.random.default_rng(shape[0] + int(ratio * 100)).random(shape)  # distinct values
    method = build({"name": "duo_attention", "patterns": str(pattern_dir(tmp_path, alpha)),
                    "head_compression_ratio": ratio})
    ours = streaming_heads(method._alpha, method.n_streaming(1000, 10)).numpy()
    assert (ours == kvpress_mask(np.clip(alpha, 0, 1), ratio)).all()


def test_equal_alpha_streams_the_lower_index_first():
    alpha = np.array([[0.5, 0.2], [0.2, 0.5], [0.2, 0.9]])
    assert streaming_heads(alpha, 2).tolist() == [[False, True], [True, False], [False, False]]


def test_streaming_count_is_the_fewest_that_meet_the_budget():
    # N = 4, L = 40, W = 6, C = 16: n >= 4 * 24 / 34 = 2.82 -> 3; mean (40 + 3 * 6) / 4 = 14.5
    assert streaming_count(4, 40, 16, 6) == 3
    assert streaming_count(4, 40, 40, 6) == 0 and streaming_count(4, 30, 40, 6) == 0
    assert streaming_count(4, 40, 6, 6) == 4
    for heads in (4, 18, 90, 1024):
        for n in (50, 300, 5000):
            for budget in range(8, n, max(1, n // 17)):
                s = streaming_count(heads, n, budget, 8)
                mean = ((heads - s) * n + s * 8) / heads
                assert mean <= budget + 1e-9
                assert s == 0 or ((heads - s + 1) * n + (s - 1) * 8) / heads > budget  # one fewer would not do


def test_budget_below_the_streaming_window_is_one_line():
    method = build({"name": "duo_attention", "patterns": str(FIXTURE)})  # W = 2 + 4
    assert method.allocate(Budget(tokens=6), 40) == (6, 2, 4)
    assert method.allocate(Budget(tokens=5), 5) == (5, 2, 4)  # the prompt fits: nothing to compress
    with pytest.raises(KVBenchError, match=r"budget 5 is below .* 2 \+ 4"):
        method.allocate(Budget(tokens=5), 40)
    fixed = build({"name": "duo_attention", "patterns": str(FIXTURE), "head_compression_ratio": 0.5})
    assert fixed.allocate(Budget(tokens=5), 40) == (6, 2, 4)  # kvpress's ratio: the budget is not used


# ----------------------------------------------------------------------------- kept sets and attention


class DuoReference:
    """kvpress's DuoAttentionPress on one layer as explicit loops: a streaming head's keys at positions
    sink_size .. L - recent_size - 1 are never attended after the prompt, decoded tokens join every head."""

    def __init__(self, k, v, streaming, sink, recent):
        self.B, self.Hkv, n, _ = k.shape
        self.heads = {}
        for b in range(self.B):
            for h in range(self.Hkv):
                masked = set(range(sink, n - recent)) if streaming[h] and n > sink + recent else set()
                self.heads[b, h] = [(j, k[b, h, j].tolist(), v[b, h, j].tolist()) for j in range(n) if j not in masked]
        self.decoded = []

    def kept(self):
        return [[[t[0] for t in self.heads[b, h]] for h in range(self.Hkv)] for b in range(self.B)]

    def append(self, k1, v1):
        self.decoded.append((k1, v1))

    def attention(self, qn):
        b_, hq, q, _ = qn.shape
        groups = hq // self.Hkv
        out = torch.zeros(b_, q, hq, D, dtype=torch.float64)
        for b in range(self.B):
            for g in range(hq):
                h = g // groups
                dec = [(kd[b, h, j].tolist(), vd[b, h, j].tolist()) for kd, vd in self.decoded for j in range(kd.shape[2])]
                for i in range(q):
                    visible = [(t[1], t[2]) for t in self.heads[b, h]] + dec[: len(dec) - q + i + 1]
                    p = softmax([dot(qn[b, g, i].tolist(), kv[0]) * SCALING for kv in visible])
                    for pj, (_, vv) in zip(p, visible):
                        for d in range(D):
                            out[b, i, g, d] += pj * vv[d]
        return out


def run_layers(method, budget, hkv, n, seed, layers=2):
    config = SimpleNamespace(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=hkv)
    cache = CompressedCache(SimpleNamespace(config=config), method, Budget(tokens=budget), reserve=4)
    g = torch.Generator().manual_seed(seed)
    data = []
    for layer_idx in range(layers):
        q, k, v = torch.randn(2, 4, n, D, generator=g), torch.randn(2, hkv, n, D, generator=g), torch.randn(2, hkv, n, D, generator=g)
        keys, values = cache.update(k, v, layer_idx)
        kvbench_attention(FakeModule("sdpa", layer_idx=layer_idx, groups=4 // hkv), q, keys, values, None,
                          scaling=SCALING, kvbench_cache=cache)
        data.append((k, v))
    return cache, data, g


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("mode", ["budget", "ratio"])
def test_kept_sets_and_decode_attention_match_kvpress_loops(tmp_path, hkv, mode):
    n, budget, sink, recent = 30, 17, 2, 5
    alpha = np.random.default_rng(hkv).random((2, hkv))
    cfg = {"name": "duo_attention", "patterns": str(pattern_dir(tmp_path, alpha, sink, recent))}
    if mode == "ratio":
        cfg["head_compression_ratio"] = 0.5
    method = build(cfg)
    heads = 2 * hkv
    # budget: mean <= 17 with W = 7, L = 30: n_s = ceil(N * 13 / 23); ratio: round(N / 2)
    n_s = math.ceil(heads * (n - budget) / (n - sink - recent)) if mode == "budget" else round(heads * 0.5)
    streaming = kvpress_mask(alpha, n_s / heads)
    cache, data, g = run_layers(method, budget, hkv, n, seed=hkv)
    kept_total = 0
    for layer_idx, (k, v) in enumerate(data):
        layer = cache.layers[layer_idx]
        reference = DuoReference(k, v, streaming[layer_idx], sink, recent)
        assert layer.ragged is not None and ragged_kept(layer) == reference.kept()
        kept_total += sum(len(x) for heads_ in reference.kept() for x in heads_)
        assert layer.ragged.prefix_keys.shape[0] == sum(len(x) for hs in reference.kept() for x in hs)  # memory freed
        module = FakeModule("sdpa", layer_idx=layer_idx, groups=4 // hkv)
        cache.phase = "decode"
        for step in range(6):
            width = 3 if step == 2 else 1
            q1 = torch.randn(2, 4, width, D, generator=g)
            k1, v1 = torch.randn(2, hkv, width, D, generator=g), torch.randn(2, hkv, width, D, generator=g)
            keys, values = cache.update(k1, v1, layer_idx)
            out, _ = kvbench_attention(module, q1, keys, values, None, scaling=SCALING, kvbench_cache=cache)
            reference.append(k1, v1)
            torch.testing.assert_close(out.double(), reference.attention(q1), atol=1e-5, rtol=1e-5)
        cache.phase = "prefill"
    if mode == "budget":
        assert kept_total / (2 * heads) <= budget  # mean tokens per (batch, layer, KV head)


def test_budget_above_the_prompt_keeps_the_full_cache():
    method = build({"name": "duo_attention", "patterns": str(FIXTURE)})
    cache, data, _ = run_layers(method, 64, 2, 30, seed=0)
    for layer, (k, _) in zip(cache.layers, data):
        assert layer.ragged is None and layer.length == 30
        torch.testing.assert_close(layer.keys[:, :, :30], k)


def test_prompt_within_the_window_is_untouched_with_a_fixed_ratio():
    method = build({"name": "duo_attention", "patterns": str(FIXTURE), "head_compression_ratio": 1.0})
    cache, _, _ = run_layers(method, 64, 2, 6, seed=0)  # L = W = 6: kvpress masks nothing
    assert all(layer.ragged is None and layer.length == 6 for layer in cache.layers)


def test_mismatched_patterns_stop_at_the_first_prefill(tmp_path):
    method = build({"name": "duo_attention", "patterns": str(pattern_dir(tmp_path, np.ones((3, 2))))})
    with pytest.raises(KVBenchError, match="cover 3 layers x 2 KV heads but the model has 2 x 2"):
        run_layers(method, 16, 2, 30, seed=0)


# ----------------------------------------------------------------------------- the tiny model


def test_tiny_model_full_budget_equals_full_and_batched_equals_alone(tiny_gqa):
    model, _ = tiny_gqa
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (1, n), generator=g) for n in (40, 23, 57, 31)]
    method = {"name": "duo_attention", "patterns": str(FIXTURE)}
    full = Session(model, build({"name": "full"}), None, reserve=8).generate(prompts[0], 8).tokens[0]
    assert Session(model, build(method), Budget(tokens=200), reserve=8).generate(prompts[0], 8).tokens[0] == full
    for settings in (method, {**method, "head_compression_ratio": 0.5}):
        requests = [Request(p, 8, [5]) for p in prompts]
        together = dict(decode_together(model, requests, build(settings), Budget(tokens=16), 4))
        for i, request in enumerate(requests):
            session = Session(model, build(settings), Budget(tokens=16), reserve=8)
            assert together[i].tokens == session.generate(request.input_ids, 8, [5]).tokens[0]
    session = Session(model, build(method), Budget(tokens=16), reserve=8)
    session.prefill(prompts[2])
    # L = 57, N = 4, W = 6: n_s = ceil(4 * 41 / 51) = 4 -> every head keeps its 2 sinks and 4 recent
    assert [ragged_kept(layer)[0] for layer in session.cache.layers] == [[[0, 1, 53, 54, 55, 56]] * 2] * 2
    session = Session(model, build(method), Budget(tokens=40), reserve=8)
    session.prefill(prompts[2])
    # C = 40: n_s = ceil(4 * 17 / 51) = 2, the lowest alpha (0.05 at 1-0, 0.2 at 0-1) stream
    assert [[len(x) for x in ragged_kept(layer)[0]] for layer in session.cache.layers] == [[57, 6], [6, 57]]
