"""Fidelity to the reference codes, each rule re-implemented here from the reference's arithmetic:

- Scissorhands / VATP-on-Scissorhands (VATP's utils_hh/modify_llama.py): the prompt's window sum divided by
  the window size (400) always, then decode rows added; kept sets over 25 decode steps, prompts 100..1000;
- HeadKV's caps (headkv/snapkv_utils.py, ReasonSnapKVCluster): Python float floor division `B // beta`;
- Ada-SnapKV as HeadKV runs it (AdaptiveSnapKVCluster, normalize=True);
- `gqa: expand`: the KV heads repeated to every query head, then SnapKV / HeadKV / Ada / PyramidKV
  selection per query head; the bytes stored are the sum of the query heads' caps.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvbench.engine import Budget, CompressedCache
from kvbench.engine.attention import kvbench_attention
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.methods.ada_snapkv import ada_caps
from kvbench.methods.headkv import headkv_caps
from tests.helpers import FakeModule, ragged_kept, scores_file

D = 8
SCALING = D**-0.5


def softmax_row(qvec, keys):
    """Softmax (float64) of one query over a list of key rows."""
    return torch.softmax((torch.stack(keys).double() @ qvec.double()) * SCALING, dim=0)


# ----------------------------------------------------------------------------- Scissorhands decode


class ScissorhandsReference:
    """VATP's Scissorhands rule per KV head, on explicit token lists {pos, k, v, s}.

    prompt: s_j = (sum over the last min(400, L) queries of A_ij, group-averaged) / divisor; then
    heavy = 2 * int(ratio / 2 * L) - 10 top scores outside the 10 newest, plus the 10 newest. Each decode
    step appends the token, adds its attention row, and drops the lowest-scored token outside the 10
    newest while over budget. `divisor` is 400 (the reference) or min(400, L) (kvbench's old rule)."""

    def __init__(self, q, k, v, ratio, window, recent, divisor, norm):
        self.q, self.norm = q, norm
        _, hq, n, _ = q.shape
        hkv = k.shape[1]
        self.G, self.Hkv, self.recent, self.seen = hq // hkv, hkv, recent, n
        self.budget = 2 * int(ratio / 2 * n)
        self.heads = []
        for h in range(hkv):
            toks = [{"pos": j, "k": k[0, h, j], "v": v[0, h, j], "s": 0.0} for j in range(n)]
            for i in range(n - min(window, n), n):
                for g in range(h * self.G, (h + 1) * self.G):
                    p = softmax_row(q[0, g, i], [t["k"] for t in toks[: i + 1]])
                    for j in range(i + 1):
                        toks[j]["s"] += float(p[j]) / self.G / divisor
            self.heads.append(self.cut(toks))

    def importance(self, tok):
        return tok["s"] * (float(tok["v"].double().abs().sum()) if self.norm else 1.0)

    def cut(self, toks):
        if len(toks) <= self.budget:
            return toks
        newest = [t for t in toks if t["pos"] >= self.seen - self.recent]
        rest = sorted((t for t in toks if t["pos"] < self.seen - self.recent),
                      key=lambda t: (self.importance(t), t["pos"]), reverse=True)
        return sorted(rest[: self.budget - len(newest)] + newest, key=lambda t: t["pos"])

    def decode(self, q1, k1, v1):
        pos, self.seen = self.seen, self.seen + 1
        for h, toks in enumerate(self.heads):
            toks.append({"pos": pos, "k": k1[0, h, 0], "v": v1[0, h, 0], "s": 0.0})
            row = [0.0] * len(toks)
            for g in range(h * self.G, (h + 1) * self.G):
                p = softmax_row(q1[0, g, 0], [t["k"] for t in toks])
                row = [r + float(x) / self.G for r, x in zip(row, p)]
            for t, r in zip(toks, row):
                t["s"] += r
            while len(toks) > self.budget:
                victim = min((t for t in toks if t["pos"] < self.seen - self.recent),
                             key=lambda t: (self.importance(t), t["pos"]))
                toks.remove(victim)

    def kept(self):
        return [sorted(t["pos"] for t in toks) for toks in self.heads]


def run_scissorhands(cfg, n, hkv, steps, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, n, D, generator=g) * 2
    k = torch.randn(1, hkv, n, D, generator=g) * 2
    v = torch.randn(1, hkv, n, D, generator=g) * torch.rand(1, hkv, n, 1, generator=g) * 3
    decode = [(torch.randn(1, 4, 1, D, generator=g) * 2, torch.randn(1, hkv, 1, D, generator=g) * 2,
               torch.randn(1, hkv, 1, D, generator=g)) for _ in range(steps)]
    cache = CompressedCache(SimpleNamespace(config=SimpleNamespace(num_hidden_layers=1)), build(cfg),
                            Budget(ratio=0.5))
    module = FakeModule("sdpa", groups=4 // hkv)
    keys, values = cache.update(k, v, 0)
    kvbench_attention(module, q, keys, values, None, scaling=SCALING, kvbench_cache=cache)
    cache.phase = "decode"
    kept = []
    for q1, k1, v1 in decode:
        keys, values = cache.update(k1, v1, 0)
        kvbench_attention(module, q1, keys, values, None, scaling=SCALING, kvbench_cache=cache)
        kept.append([sorted(cache.layers[0].view("pos")[0, h].tolist()) for h in range(hkv)])
    return (q, k, v, decode), kept


@pytest.mark.parametrize("n,hkv,name", [(100, 2, "scissorhands"), (250, 4, "vatp"), (399, 2, "scissorhands"),
                                        (1000, 2, "vatp")])
def test_scissorhands_decode_divides_the_window_sum_by_400(n, hkv, name):
    cfg = {"name": name, "base": "scissorhands", "sinks": 0} if name == "vatp" else {"name": name}
    steps = 25
    (q, k, v, decode), engine = run_scissorhands(cfg, n, hkv, steps, seed=n + hkv)
    reference = ScissorhandsReference(q, k, v, 0.5, 400, 10, divisor=400, norm=name == "vatp")
    for step, (q1, k1, v1) in enumerate(decode):
        reference.decode(q1, k1, v1)
        assert engine[step] == reference.kept(), f"step {step}"


def test_the_divisor_changes_decode_evictions_for_short_prompts():
    # the check above is not vacuous: for a 100-token prompt, dividing by 100 instead of 400 evicts others
    (q, k, v, decode), _ = run_scissorhands({"name": "scissorhands"}, 100, 2, 25, seed=7)
    reference = ScissorhandsReference(q, k, v, 0.5, 400, 10, divisor=400, norm=False)
    old_rule = ScissorhandsReference(q, k, v, 0.5, 400, 10, divisor=100, norm=False)
    differs = False
    for q1, k1, v1 in decode:
        reference.decode(q1, k1, v1)
        old_rule.decode(q1, k1, v1)
        differs |= reference.kept() != old_rule.kept()
    assert differs


# ----------------------------------------------------------------------------- HeadKV caps


def official_headkv_caps(means, layers, heads, budget_c, window, beta, temp=1.0):
    """HeadKV's ReasonSnapKVCluster arithmetic: numpy / Python floats, `B // beta`, torch.round."""
    scores = np.array(means, dtype=np.float64)
    scores = scores / sum(scores.tolist())
    scores = scores**temp
    scores = scores / scores.sum()
    base = budget_c - window
    pool = (base // beta) * layers * heads
    floor = base - base // beta
    return [[int(np.round(scores[layer * heads + h] * pool + floor)) for h in range(heads)] for layer in range(layers)]


BUDGETS = [16, 32, 64, 96, 128, 256, 512, 1024, 2048]
BETAS = [1.005, 1.01, 1.02, 1.1, 1.2]


@pytest.mark.parametrize("beta", BETAS)
def test_headkv_caps_equal_the_official_formula_on_the_grid(beta):
    g = torch.Generator().manual_seed(int(beta * 1000))
    layers, heads = 4, 8
    importance = torch.rand(layers, heads, generator=g, dtype=torch.float64) ** 3
    means = importance.flatten().tolist()
    for budget in BUDGETS:
        for window in (8, 0):  # C - 8 (the runs) and C itself as B: covers both grids
            if budget - window <= 0:
                continue
            caps = headkv_caps(importance, heads, budget - window, beta).tolist()
            assert caps == official_headkv_caps(means, layers, heads, budget, window, beta), (budget, window)


def test_float_floor_division_is_what_differs():
    # 88 // 1.1 == 79.0 in Python floats while floor(88 / 1.1) == 80. s = (.1, .2, .3, .4), one layer:
    # official: pool = 79 * 4 = 316, floor 9 -> 40.6, 72.2, 103.8, 135.4; floor(B / beta) would give 40, 72, 104, 136
    caps = headkv_caps(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64), 4, 88, 1.1)
    assert caps.tolist() == [[41, 72, 104, 135]]


# ----------------------------------------------------------------------------- Ada-SnapKV


def official_ada_caps(scores, base, floor):
    """AdaptiveSnapKVCluster.update_kv with normalize=True, one sequence: lists of per-head scores."""
    flat = []  # (weighted score, head): the official flattens the sorted, weighted rows; index // length = head
    for h, row in enumerate(sorted(r, reverse=True) for r in scores):
        weight = sum(row[:base]) / sum(row)
        flat += [(x * weight, h) for x in row]
    chosen = sorted(flat, key=lambda t: t[0], reverse=True)[: len(scores) * base]
    counts = [sum(1 for _, h in chosen if h == head) for head in range(len(scores))]
    return [round(c * (1 - floor) + int(base * floor)) for c in counts]


@pytest.mark.parametrize("seed", range(6))
def test_ada_caps_equal_the_official_normalised_allocation(seed):
    g = torch.Generator().manual_seed(seed)
    heads, prefix, base = 8, 60, 12
    # heads with very different mass: normalisation moves budget between them
    scores = torch.rand(1, heads, prefix, generator=g, dtype=torch.float64) ** torch.linspace(1, 8, heads)[:, None]
    assert ada_caps(scores, base, 0.2).tolist() == [official_ada_caps(scores[0].tolist(), base, 0.2)]


def test_ada_normalisation_can_be_switched_off():
    scores = torch.tensor([[[9.0, 8, 7, 6, 5, 0], [4.5, 1, 1, 1, 1, 1]]])
    assert ada_caps(scores, 3, 0.2, normalize=False).tolist() == [[4, 1]]
    assert build({"name": "ada_snapkv", "normalize": False}).label == "ada_snapkv-plain"


# ----------------------------------------------------------------------------- gqa: expand


def expanded_reference(q, k, caps_fn, window, kernel):
    """Repeat the KV heads to every query head, then per query head: window mean (no group average),
    max-pool, top cap prefix tokens (newer wins ties) + the window. Returns kept positions [b][hq]."""
    b_, hq, n, _ = q.shape
    group = hq // k.shape[1]
    kept = []
    for b in range(b_):
        pooled_all = []
        for head in range(hq):
            keys = k[b, head // group]
            mean = [0.0] * n
            for i in range(n - window, n):
                p = softmax_row(q[b, head, i], list(keys[: i + 1]))
                for j in range(i + 1):
                    mean[j] += float(p[j]) / window
            prefix = n - window
            pooled_all.append([max(mean[max(0, j - kernel // 2): min(prefix, j + kernel // 2 + 1)])
                               for j in range(prefix)])
        caps = caps_fn(pooled_all)
        row = []
        for head in range(hq):
            pooled = pooled_all[head]
            best = sorted(range(len(pooled)), key=lambda j: (pooled[j], j), reverse=True)[: caps[head]]
            row.append(sorted(best) + list(range(n - window, n)))
        kept.append(row)
    return kept


@pytest.mark.parametrize("name", ["snapkv", "headkv", "ada_snapkv", "pyramidkv"])
def test_expand_keeps_per_query_head_as_repeat_then_select(tmp_path, name):
    n, budget, window, kernel, hkv, hq = 48, 16, 4, 3, 2, 4
    importance = [[4.0, 1.0, 0.5, 2.5], [1.0, 1.0, 6.0, 0.2]]
    cfg = {"name": name, "window": window, "kernel": kernel, "gqa": "expand"}
    if name == "headkv":
        cfg.update(head_scores=str(scores_file(tmp_path, importance)), beta=1.2)
    method = build(cfg)
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=hq, num_key_value_heads=hkv)
    cache = CompressedCache(SimpleNamespace(config=config), method, Budget(tokens=budget), reserve=4)
    g = torch.Generator().manual_seed(len(name))
    q = torch.randn(1, hq, n, D, generator=g) * 1.5
    k = torch.randn(1, hkv, n, D, generator=g) * 1.5
    v = torch.randn(1, hkv, n, D, generator=g)
    layer_idx = 0
    keys, values = cache.update(k, v, layer_idx)
    kvbench_attention(FakeModule("sdpa", layer_idx=layer_idx, groups=hq // hkv), q, keys, values, None,
                      scaling=SCALING, kvbench_cache=cache)
    per_head = budget - window

    def caps_fn(pooled):
        if name == "snapkv":
            return [per_head] * hq
        if name == "headkv":
            flat = [x for row in importance for x in row]
            return official_headkv_caps(flat, 2, hq, budget, window, 1.2)[layer_idx]
        if name == "ada_snapkv":
            return official_ada_caps(pooled, per_head, 0.2)
        lo = per_head // 20  # PyramidKV, 2 layers, layer 0: the top of the schedule
        return [min(2 * per_head - lo, n - window)] * hq

    layer = cache.layers[layer_idx]
    expected = expanded_reference(q, k, caps_fn, window, kernel)
    assert layer.ragged.heads == hq
    assert ragged_kept(layer) == expected
    # every stored key is the key of its KV head at that position
    for head in range(hq):
        start = int(layer.ragged.cu_lens[head])
        torch.testing.assert_close(layer.ragged.prefix_keys[start: start + len(expected[0][head])],
                                   k[0, head // (hq // hkv), expected[0][head]])
    # bytes stored = sum of the query heads' caps (window included); full = the KV heads' full cache
    cache.phase = "decode"
    keys, values = cache.update(torch.randn(1, hkv, 1, D), torch.randn(1, hkv, 1, D), layer_idx)
    out, _ = kvbench_attention(FakeModule("sdpa", layer_idx=layer_idx, groups=hq // hkv), torch.randn(1, hq, 1, D),
                               keys, values, None, scaling=SCALING, kvbench_cache=cache)
    assert out.shape == (1, 1, hq, D)
    kv = cache.kv_summary()
    stored = sum(len(x) + 1 for x in expected[0])
    assert kv["kv_kept_tokens"] == stored and kv["kv_kept_bytes"] == stored * 2 * D * 4
    assert kv["kv_full_tokens"] == hkv * (n + 1)


def test_expand_label_and_settings():
    assert build({"name": "snapkv", "gqa": "expand"}).label == "snapkv-expand"
    assert build({"name": "pyramidkv", "gqa": "expand"}).label == "pyramidkv-expand"
    assert build({"name": "snapkv"}).per_head is False and build({"name": "snapkv", "gqa": "expand"}).per_head
    with pytest.raises(KVBenchError, match="method.gqa=query"):
        build({"name": "snapkv", "gqa": "query"})
    with pytest.raises(KVBenchError, match="method.sinks=0"):
        build({"name": "snapkv", "gqa": "expand", "sinks": 4})


def test_expand_generation_on_the_tiny_model_stores_g_times_the_tokens(tiny_gqa):
    from kvbench.models.generator import generate

    model, _ = tiny_gqa
    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    ids = torch.randint(4, 200, (1, 150), generator=torch.Generator().manual_seed(2))
    kv_gen = generate(model, ids, build({"name": "snapkv", "window": 8}), Budget(tokens=40), max_new_tokens=4)
    ex_gen = generate(model, ids, build({"name": "snapkv", "window": 8, "gqa": "expand"}), Budget(tokens=40),
                      max_new_tokens=4)
    decoded = len(ex_gen.tokens[0]) - 1
    # kv_* count the prompt's cache as the method left it; what decoding added is kv_end_kept_tokens
    assert ex_gen.kv["kv_kept_tokens"] == cfg.num_hidden_layers * cfg.num_attention_heads * 40
    assert ex_gen.kv["kv_end_kept_tokens"] == cfg.num_hidden_layers * cfg.num_attention_heads * (40 + decoded)
    assert ex_gen.kv["kv_kept_bytes"] == group * kv_gen.kv["kv_kept_bytes"]
    assert ex_gen.kv["kv_full_bytes"] == kv_gen.kv["kv_full_bytes"]


# ----------------------------------------------------------------------------- one BOS in a templated prompt


def test_chat_template_with_bos_gives_one_bos():
    from transformers import AutoTokenizer

    from kvbench.models import wrap_chat
    from kvbench.models.generator import Generator
    from kvbench.models.loading import BYTE_TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(BYTE_TOKENIZER_DIR))
    # a Llama-3-like template that writes the BOS itself
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}</s>"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>\n{% endif %}")
    generator = Generator(model=None, tokenizer=tok, method=build({"name": "full"}), chat_format="tokenizer")
    text = wrap_chat("What is 2 + 2?", "tokenizer", tok)
    assert text.startswith("<s>")
    ids = generator.encode(text)[0].tolist()
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    # an unwrapped prompt (trec, lcc, ...) still gets the tokenizer's BOS, once
    ids = generator.encode("What is 2 + 2?")[0].tolist()
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    # the same text through the tokenizer's defaults would have held two: the case this guards
    assert tok(text).input_ids.count(tok.bos_token_id) == 2
