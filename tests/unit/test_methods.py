"""Every method's kept set against a brute-force reference of METHODS.md's formula.

The engine runs one attention layer on random inputs (prefill, then >= 50 decode
steps); the reference keeps explicit Python lists of tokens per head, computes
softmax attention with loops, and applies the formula as written. MHA and GQA, fp32.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from kvbench.engine import Budget, CompressedCache
from kvbench.engine.attention import kvbench_attention
from kvbench.errors import KVBenchError
from kvbench.methods import REGISTRY, build
from tests.conftest import method_config
from tests.helpers import SCALING, D, FakeModule, dot, softmax, token_lists


def norm(vec, kind):
    if kind == "l1":
        return sum(abs(x) for x in vec)
    if kind == "l2":
        return math.sqrt(sum(x * x for x in vec))
    if kind == "linf":
        return max(abs(x) for x in vec)
    return 1.0


class Reference:
    """Explicit lists per (batch, kv head): tokens as dicts {pos, k, v, s}."""

    def __init__(self, kind, q, k, v, budget, sinks, recent, **opts):
        self.kind, self.opts = kind, opts
        self.budget, self.sinks, self.recent = budget, sinks, recent
        self.heads = token_lists(self, q, k, v, s=0.0)
        self.prefill(q)

    def probs(self, qvec, toks, upto=None):
        visible = toks if upto is None else [t for t in toks if t["pos"] <= upto]
        p = softmax([dot(qvec, t["k"]) * SCALING for t in visible])
        return {t["pos"]: pi for t, pi in zip(visible, p)}

    def importance(self, tok):
        if self.kind in ("vatp", "scissorhands"):
            return tok["s"] * norm(tok["v"], self.opts.get("norm", "none"))
        return tok["s"]

    def protected(self, tok):
        return tok["pos"] < self.sinks or tok["pos"] >= self.seen - self.recent

    def prefill(self, q):
        n = self.seen
        for (b, h), toks in self.heads.items():
            group = range(h * self.G, (h + 1) * self.G)
            if self.kind == "h2o" or (self.kind == "vatp" and self.opts["base"] == "h2o"):
                for i in range(n):  # every query that sees j
                    for g in group:
                        for pos, p in self.probs(q[b, g, i].tolist(), toks, upto=i).items():
                            toks[pos]["s"] += p / self.G
            elif self.kind in ("vatp", "scissorhands"):  # scissorhands base: mean of the last `window` queries
                window = min(self.opts["window"], n)
                for i in range(n - window, n):
                    for g in group:
                        for pos, p in self.probs(q[b, g, i].tolist(), toks, upto=i).items():
                            toks[pos]["s"] += p / self.G / window
            elif self.kind == "snapkv":
                w, kernel = min(self.opts["window"], n), self.opts["kernel"]
                mean = [0.0] * n
                for i in range(n - w, n):
                    for g in group:
                        for pos, p in self.probs(q[b, g, i].tolist(), toks, upto=i).items():
                            mean[pos] += p / self.G / w
                prefix = n - w
                for j in range(prefix):
                    lo, hi = max(0, j - kernel // 2), min(prefix, j + kernel // 2 + 1)
                    toks[j]["s"] = max(mean[lo:hi])
            elif self.kind == "tova":  # the last query, averaged over every head of the layer
                for j in range(n):
                    toks[j]["s"] = 0.0
                for hh in range(self.Hkv):
                    for g in range(hh * self.G, (hh + 1) * self.G):
                        for pos, p in self.probs(q[b, g, n - 1].tolist(), self.heads[b, hh]).items():
                            toks[pos]["s"] += p / self.Hq
            elif self.kind == "streamingllm":
                for t in toks:
                    t["s"] = t["pos"]
            if n > self.budget:
                keep = [t for t in toks if self.protected(t)]
                # highest importance first; among equals the more recent token
                rest = sorted(
                    (t for t in toks if not self.protected(t)), key=lambda t: (self.importance(t), t["pos"]), reverse=True
                )
                keep += rest[: self.budget - len(keep)]
                self.heads[b, h] = sorted(keep, key=lambda t: t["pos"])

    def decode(self, q1, k1, v1):
        pos = self.seen
        self.seen += 1
        for (b, h), toks in self.heads.items():
            toks.append({"pos": pos, "k": k1[b, h, 0].tolist(), "v": v1[b, h, 0].tolist(), "s": 0.0})
        if self.kind == "snapkv":
            return
        rows = {}
        for (b, h), toks in self.heads.items():
            row = {t["pos"]: 0.0 for t in toks}
            for g in range(h * self.G, (h + 1) * self.G):
                for p_pos, p in self.probs(q1[b, g, 0].tolist(), toks).items():
                    row[p_pos] += p / self.G
            rows[b, h] = row
        for (b, h), toks in self.heads.items():
            for t in toks:
                if self.kind == "tova":  # the current query only, averaged over all heads
                    t["s"] = sum(rows[b, hh][t["pos"]] for hh in range(self.Hkv)) / self.Hkv
                elif self.kind == "streamingllm":
                    t["s"] = t["pos"]
                else:
                    t["s"] += rows[b, h][t["pos"]]
            while len(toks) > self.budget:
                victim = min((t for t in toks if not self.protected(t)), key=lambda t: (self.importance(t), t["pos"]))
                toks.remove(victim)

    def kept(self):
        return [[sorted(t["pos"] for t in self.heads[b, h]) for h in range(self.Hkv)] for b in range(self.B)]


def engine_kept(cache):
    pos = cache.layers[0].view("pos")
    return [[sorted(pos[b, h].tolist()) for h in range(pos.shape[1])] for b in range(pos.shape[0])]


def random_inputs(hkv, n, steps, seed):
    g = torch.Generator().manual_seed(seed)
    B, Hq = 2, 4
    q = torch.randn(B, Hq, n, D, generator=g) * 1.5
    k = torch.randn(B, hkv, n, D, generator=g) * 1.5
    v = torch.randn(B, hkv, n, D, generator=g) * torch.rand(B, hkv, n, 1, generator=g) * 3
    decode = [
        (torch.randn(B, Hq, 1, D, generator=g) * 1.5, torch.randn(B, hkv, 1, D, generator=g) * 1.5,
         torch.randn(B, hkv, 1, D, generator=g) * torch.rand(B, hkv, 1, 1, generator=g) * 3)
        for _ in range(steps)
    ]
    return q, k, v, decode


CASES = [
    # (method config, budget, reference kind, sinks, recent, reference options)
    ({"name": "streamingllm", "stage": "decode"}, 16, "streamingllm", 4, 12, {}),
    ({"name": "h2o"}, 16, "h2o", 0, 8, {}),
    ({"name": "h2o", "recent_fraction": 0.25}, 16, "h2o", 0, 4, {}),
    ({"name": "vatp", "sinks": 4}, 16, "vatp", 4, 8, {"base": "h2o", "norm": "l1"}),
    ({"name": "vatp", "sinks": 4, "norm": "l2"}, 16, "vatp", 4, 8, {"base": "h2o", "norm": "l2"}),
    ({"name": "vatp", "sinks": 4, "norm": "linf"}, 16, "vatp", 4, 8, {"base": "h2o", "norm": "linf"}),
    ({"name": "vatp", "sinks": 20}, 40, "vatp", 20, 20, {"base": "h2o", "norm": "l1"}),
    ({"name": "vatp", "base": "scissorhands", "sinks": 3, "window": 12, "recent_window": 5}, 16, "vatp", 3, 5,
     {"base": "scissorhands", "norm": "l1", "window": 12}),
    ({"name": "scissorhands", "window": 12, "recent_window": 5}, 16, "scissorhands", 0, 5,
     {"base": "scissorhands", "norm": "none", "window": 12}),
    ({"name": "snapkv", "window": 6, "kernel": 7}, 16, "snapkv", 0, 6, {"window": 6, "kernel": 7}),
    ({"name": "snapkv", "window": 4, "kernel": 3}, 12, "snapkv", 0, 4, {"window": 4, "kernel": 3}),
    ({"name": "tova"}, 16, "tova", 0, 0, {}),
]


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c[0].values()))
def test_kept_set_matches_reference_at_prefill_and_every_decode_step(case, hkv):
    cfg, budget, kind, sinks, recent, opts = case
    n = 64 if budget > 20 else 40
    q, k, v, decode = random_inputs(hkv, n, steps=55, seed=hash((kind, hkv, budget)) % 1000)
    method = build(cfg)
    cache = CompressedCache(SimpleNamespace(config=SimpleNamespace(num_hidden_layers=1)), method, Budget(tokens=budget))
    module = FakeModule("sdpa", groups=4 // hkv)
    keys, values = cache.update(k, v, 0)
    kvbench_attention(module, q, keys, values, None, scaling=SCALING, kvbench_cache=cache)
    reference = Reference(kind, q, k, v, budget, sinks, recent, **opts)
    assert engine_kept(cache) == reference.kept()
    cache.phase = "decode"
    for step, (q1, k1, v1) in enumerate(decode):
        keys, values = cache.update(k1, v1, 0)
        kvbench_attention(module, q1, keys, values, None, scaling=SCALING, kvbench_cache=cache)
        reference.decode(q1, k1, v1)
        assert engine_kept(cache) == reference.kept(), f"step {step}"
    # kept keys/values are the inputs at those positions (nothing is mixed up by slot reuse)
    all_k = torch.cat([k] + [d[1] for d in decode], dim=2)
    layer = cache.layers[0]
    pos = layer.view("pos")
    torch.testing.assert_close(layer.keys[:, :, : layer.length], all_k.gather(2, pos[..., None].expand(-1, -1, -1, D)))


def test_every_registered_method_has_a_config_and_a_case():
    from kvbench.resources import CONFIG_DIR

    names = {build(method_config(p)).name for p in (CONFIG_DIR / "method").glob("*.yaml")}
    assert names == set(REGISTRY)
    # weightedkv: test_weightedkv.py; per-head budgets: test_headkv.py; key/value scorers: test_scorers.py
    others = {"full", "weightedkv", "headkv", "ada_snapkv", "pyramidkv",
              "knorm", "keydiff", "lagkv", "random",  # test_scorers.py
              "duo_attention", "expected_attention", "qfilter",  # test_duo_attention.py, test_expected_attention.py,
              "simlayerkv", "cake", "kvzip"}  # test_qfilter.py, test_simlayerkv.py, test_cake.py, test_kvzip.py
    assert {c[0]["name"] for c in CASES} | others == set(REGISTRY)


@pytest.mark.parametrize(
    "cfg,ratio,prompt,expected",
    [
        ({"name": "h2o"}, 0.5, 101, (50, 0, 25)),  # heavy floor(0.25 L) + recent floor(0.25 L)
        ({"name": "h2o"}, 0.3, 100, (30, 0, 15)),
        ({"name": "vatp"}, 0.5, 101, (50, 20, 25)),  # 20 sinks inside the heavy part
        ({"name": "vatp", "base": "scissorhands"}, 0.5, 101, (50, 20, 10)),  # heavy 2 floor(0.25 L) - 10
        ({"name": "scissorhands"}, 0.5, 203, (100, 0, 10)),
        ({"name": "streamingllm"}, 0.5, 101, (50, 4, 46)),
        ({"name": "snapkv"}, 0.5, 101, (50, 0, 32)),
        ({"name": "tova"}, 0.5, 101, (50, 0, 0)),
    ],
)
def test_ratio_budget_allocation(cfg, ratio, prompt, expected):
    assert build(cfg).allocate(Budget(ratio=ratio), prompt) == expected


def test_token_budget_allocation_edges():
    assert build({"name": "h2o"}).allocate(Budget(tokens=1), 50) == (1, 0, 0)
    assert build({"name": "vatp"}).allocate(Budget(tokens=1), 50) == (1, 1, 0)
    assert build({"name": "vatp"}).allocate(Budget(tokens=21), 50) == (21, 11, 10)
    assert build({"name": "streamingllm"}).allocate(Budget(tokens=2), 50) == (2, 2, 0)


def test_method_settings_are_checked():
    with pytest.raises(KVBenchError, match="snapkv compresses the prompt only"):
        build({"name": "snapkv", "stage": "decode"})
    with pytest.raises(KVBenchError, match="method.norm=l3"):
        build({"name": "vatp", "norm": "l3"})
    with pytest.raises(KVBenchError, match="has no setting heavy"):
        build({"name": "h2o", "heavy": 3})
    with pytest.raises(KVBenchError, match="method.stage=both"):
        build({"name": "h2o", "stage": "both"})


def test_labels_keep_variants_apart():
    assert build({"name": "vatp"}).label == "vatp"
    assert build({"name": "vatp", "base": "scissorhands"}).label == "vatp-scissorhands"
    assert build({"name": "vatp", "norm": "l2"}).label == "vatp-l2"
    assert build({"name": "scissorhands"}).label == "scissorhands"


def test_h2o_laid_out_as_weightedkv_baselines():
    method = build({"name": "h2o", "sinks": 4, "sinks_in_recent": True})
    assert method.allocate(Budget(tokens=1024), None) == (1024, 4, 508)  # 4 + 508 recent + 512 heavy
    assert method.allocate(Budget(tokens=256), None) == (256, 4, 124)
    assert method.label == "h2o-sink4" and build({"name": "h2o"}).label == "h2o"
    assert build({"name": "h2o", "sinks": 4}).allocate(Budget(tokens=256), None) == (256, 4, 128)
