"""HeadKV, Ada-SnapKV and PyramidKV: allocations worked by hand, kept sets and ragged attention
against explicit-loop references, the stored bytes, and runs through the CLI entry."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvbench.engine import Budget, CompressedCache
from kvbench.engine.attention import kvbench_attention
from kvbench.engine.ragged import merge_partials
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.methods.ada_snapkv import ada_caps
from kvbench.methods.head_scores import load_head_scores
from kvbench.methods.headkv import headkv_caps
from kvbench.methods.layers import pyramid_cap
from tests.helpers import SCALING, D, FakeModule, dot, ragged_kept, scores_file, softmax

# ----------------------------------------------------------------------------- head-score files


def test_published_format_loads_as_it_is(tmp_path):
    # HeadKV's files: one line, "layer-head" keys in insertion order, lists of per-run scores (some empty)
    path = tmp_path / "Meta-Llama-3-8B-Instruct_retrieval_reasoning_heads.json"
    path.write_text('{"0-0": [0.5, 0.25], "0-1": [], "1-0": [0.125], "1-1": [0.0, 0.75, 0.75]}')
    importance = load_head_scores(path)
    assert importance.tolist() == [[0.375, 0.0], [0.125, 0.5]]


@pytest.mark.parametrize("text,message", [
    ('{"0-0": [1.0], "1-1": [2.0]}', "lacks heads 0-1, 1-0"),
    ('{"layer0": [1.0]}', "is not \"layer-head\""),
    ("[1, 2]", "one JSON object"),
    ("{", "not valid JSON"),
])
def test_bad_score_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(KVBenchError, match=message):
        load_head_scores(path)


def test_missing_score_file_says_how_to_make_one(tmp_path):
    with pytest.raises(KVBenchError, match="estimate_head_scores.py"):
        build({"name": "headkv", "head_scores": str(tmp_path / "none.json")})
    with pytest.raises(KVBenchError, match="method.head_scores=PATH"):
        build({"name": "headkv"})


# ----------------------------------------------------------------------------- allocation


@pytest.mark.parametrize("beta,expected", [
    # B = 100, L = 1, H = 4, s = (.1, .2, .3, .4):
    # beta 1.005: pool = 99 * 4 = 396, floor = 1:  39.6+1, 79.2+1, 118.8+1, 158.4+1
    (1.005, [41, 80, 120, 159]),
    # beta 1.2: pool = 83 * 4 = 332, floor = 17:  33.2+17, 66.4+17, 99.6+17, 132.8+17
    (1.2, [50, 83, 117, 150]),
    # beta 5: pool = 20 * 4 = 80, floor = 80:  8+80, 16+80, 24+80, 32+80
    (5, [88, 96, 104, 112]),
])
def test_headkv_caps_by_hand(beta, expected):
    caps = headkv_caps(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), heads=4, per_head=100, beta=beta)
    assert caps.tolist() == [expected]
    assert sum(expected) == 100 * 4


def test_headkv_caps_gqa_sums_a_groups_scores():
    # query heads (1, 2 | 3, 4) -> KV heads s = (.3, .7); beta 1.2: pool = 83 * 2, floor 17
    caps = headkv_caps(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), heads=2, per_head=100, beta=1.2)
    assert caps.tolist() == [[round(0.3 * 166 + 17), round(0.7 * 166 + 17)]] == [[67, 133]]


@pytest.mark.parametrize("beta", [1.005, 1.2, 5, 10])
@pytest.mark.parametrize("per_head", [56, 120, 504])
def test_headkv_caps_sum_to_the_budget_up_to_rounding(beta, per_head):
    importance = torch.rand(32, 32, generator=torch.Generator().manual_seed(per_head)) ** 4
    caps = headkv_caps(importance, heads=8, per_head=per_head, beta=beta, temperature=1.0)
    assert caps.shape == (32, 8)
    assert abs(int(caps.sum()) - per_head * 32 * 8) <= 32 * 8 / 2
    assert int(caps.min()) >= per_head - math.floor(per_head / beta)  # nobody below the floor


def test_temperature_sharpens_the_allocation():
    importance = torch.tensor([[1.0, 3.0]])
    flat = headkv_caps(importance, 2, 100, 1.005, temperature=1.0)
    sharp = headkv_caps(importance, 2, 100, 1.005, temperature=2.0)
    assert sharp[0, 1] > flat[0, 1] > flat[0, 0] > sharp[0, 0]


def test_ada_caps_by_hand():
    # 2 heads x 6 prefix tokens, B = 3: the top 6 of all 12 scores are 5 in head 0 and 1 in head 1;
    # floor(0.2 * 3) = 0, so caps = round(5 * 0.8), round(1 * 0.8) = 4, 1
    scores = torch.tensor([[[9.0, 8, 7, 6, 5, 0], [4.5, 1, 1, 1, 1, 1]]])
    assert ada_caps(scores, per_head=3, floor=0.2).tolist() == [[4, 1]]
    # alpha 1: every head gets exactly B
    assert ada_caps(scores, per_head=3, floor=1.0).tolist() == [[3, 3]]


def test_pyramid_caps_by_hand():
    # B = 100, beta 20, 5 layers, long prefix: lo = 5, hi = 195, step = 47 -> 195 148 101 54 7 (mean 101)
    assert [pyramid_cap(layer, 5, 100, 10_000, 20) for layer in range(5)] == [195, 148, 101, 54, 7]
    # a prefix of 150 clips the top: hi = 150, lo = 50, step 25
    assert [pyramid_cap(layer, 5, 100, 150, 20) for layer in range(5)] == [150, 125, 100, 75, 50]


# ----------------------------------------------------------------------------- kept sets and ragged attention


class RaggedReference:
    """Explicit lists per (batch, KV head) of kept tokens {pos, k, v}; SnapKV scoring written as loops."""

    def __init__(self, q, k, v, caps, window, kernel):
        self.B, self.Hq, n, _ = q.shape
        self.Hkv = k.shape[1]
        self.G = self.Hq // self.Hkv
        self.heads = {}
        self.decoded = []
        for b in range(self.B):
            for h in range(self.Hkv):
                toks = [{"pos": j, "k": k[b, h, j].tolist(), "v": v[b, h, j].tolist()} for j in range(n)]
                mean = [0.0] * n
                for i in range(n - window, n):
                    for g in range(h * self.G, (h + 1) * self.G):
                        p = softmax([dot(q[b, g, i].tolist(), t["k"]) * SCALING for t in toks[: i + 1]])
                        for j, pj in enumerate(p):
                            mean[j] += pj / self.G / window
                prefix = n - window
                pooled = [max(mean[max(0, j - kernel // 2): min(prefix, j + kernel // 2 + 1)]) for j in range(prefix)]
                best = sorted(range(prefix), key=lambda j: (pooled[j], j), reverse=True)[: caps[b][h]]
                self.heads[b, h] = [toks[j] for j in sorted(best)] + toks[prefix:]

    def append(self, k1, v1):
        self.decoded.append((k1, v1))

    def attention(self, qn):
        """Output (B, q, Hq, D) of new queries qn (B, Hq, q, D): kept prefix + decoded tokens up to themselves."""
        b_, hq, q, _ = qn.shape
        out = torch.zeros(b_, q, hq, D, dtype=torch.float64)
        for b in range(self.B):
            for g in range(hq):
                h = g // self.G
                dec = [(kd[b, h, j].tolist(), vd[b, h, j].tolist()) for kd, vd in self.decoded for j in range(kd.shape[2])]
                for i in range(q):
                    visible = [(t["k"], t["v"]) for t in self.heads[b, h]] + dec[: len(dec) - q + i + 1]
                    p = softmax([dot(qn[b, g, i].tolist(), kv[0]) * SCALING for kv in visible])
                    for pj, (_, vv) in zip(p, visible):
                        for d in range(D):
                            out[b, i, g, d] += pj * vv[d]
        return out

    def kept(self):
        return [[[t["pos"] for t in self.heads[b, h]] for h in range(self.Hkv)] for b in range(self.B)]


def one_layer_cache(method, budget, hkv, num_layers=1, layer_idx=0, reserve=4):
    config = SimpleNamespace(num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=hkv)
    cache = CompressedCache(SimpleNamespace(config=config), method, Budget(tokens=budget), reserve=reserve)
    return cache


def inputs(hkv, n, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, n, D, generator=g) * 1.5
    k = torch.randn(2, hkv, n, D, generator=g) * 1.5
    v = torch.randn(2, hkv, n, D, generator=g)
    return q, k, v, g


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("name", ["headkv", "ada_snapkv", "pyramidkv"])
def test_ragged_kept_set_and_attention_match_loops_at_prefill_and_decode(tmp_path, hkv, name):
    n, budget, window, kernel = 40, 14, 4, 3
    importance = [[4.0, 1.0, 0.5, 2.5], [1.0, 1.0, 6.0, 0.2]]
    cfg = {"name": name, "window": window, "kernel": kernel}
    if name == "headkv":
        cfg.update(head_scores=str(scores_file(tmp_path, importance)), beta=1.2)
    method = build(cfg)
    layer_idx = 1  # layer 1 of 2: PyramidKV's lower budget
    cache = one_layer_cache(method, budget, hkv, num_layers=2, layer_idx=layer_idx)
    q, k, v, g = inputs(hkv, n, seed=hkv * 7 + len(name))
    module = FakeModule("sdpa", layer_idx=layer_idx, groups=4 // hkv)
    keys, values = cache.update(k, v, layer_idx)
    kvbench_attention(module, q, keys, values, None, scaling=SCALING, kvbench_cache=cache)
    layer = cache.layers[layer_idx]
    assert layer.ragged is not None and layer.keys is None  # the dense prompt is gone

    # the caps as each method's formula gives them, worked independently
    per_head = budget - window
    if name == "headkv":
        caps = headkv_caps(torch.tensor(importance, dtype=torch.float64), hkv, per_head, 1.2)[layer_idx].tolist()
        caps = [caps, caps]
    elif name == "pyramidkv":
        caps = [[pyramid_cap(layer_idx, 2, per_head, n - window, 20)] * hkv] * 2
    else:
        caps = None  # Ada: read back, then checked against the reference's own top-k below
    if caps is None:
        caps = [[len(x) - window for x in heads] for heads in ragged_kept(layer)]
        assert all(sum(c) == pytest.approx(hkv * per_head, abs=hkv) for c in caps)
    reference = RaggedReference(q, k, v, caps, window, kernel)
    assert ragged_kept(layer) == reference.kept()
    # stored: exactly the kept tokens, nothing padded
    kept_total = sum(len(x) for heads in reference.kept() for x in heads)
    assert layer.ragged.prefix_keys.shape == (kept_total, D)
    all_k = k.permute(0, 1, 2, 3)
    for b in range(2):
        for h in range(hkv):
            start = int(layer.ragged.cu_lens[b * hkv + h])
            positions = reference.kept()[b][h]
            torch.testing.assert_close(layer.ragged.prefix_keys[start: start + len(positions)], all_k[b, h, positions])

    # decode: 22 single steps and one chunk of 3 new tokens; outputs against the loops
    cache.phase = "decode"
    for step in range(23):
        width = 3 if step == 11 else 1
        q1 = torch.randn(2, 4, width, D, generator=g)
        k1, v1 = torch.randn(2, hkv, width, D, generator=g), torch.randn(2, hkv, width, D, generator=g)
        keys, values = cache.update(k1, v1, layer_idx)
        out, _ = kvbench_attention(module, q1, keys, values, None, scaling=SCALING, kvbench_cache=cache)
        reference.append(k1, v1)
        torch.testing.assert_close(out.double(), reference.attention(q1), atol=1e-5, rtol=1e-5, msg=f"step {step}")
    assert layer.ragged.decoded == 25 and layer.seen == n + 25  # grew past reserve=4 without touching the prefix
    assert layer.get_mask_sizes(1) == (layer.ragged.max_len + 25 + 1, 0)
    assert ragged_kept(layer) == reference.kept()


def test_merge_partials_equals_one_softmax():
    g = torch.Generator().manual_seed(0)
    logits, values = torch.randn(3, 10, generator=g), torch.randn(10, 5, generator=g)
    full = torch.softmax(logits, -1) @ values
    a, b = logits[:, :4], logits[:, 4:]
    out = merge_partials(torch.softmax(a, -1) @ values[:4], a.logsumexp(-1), torch.softmax(b, -1) @ values[4:],
                         b.logsumexp(-1))
    torch.testing.assert_close(out, full)


def test_short_prompt_stays_dense(tmp_path):
    method = build({"name": "ada_snapkv", "window": 4})
    cache = one_layer_cache(method, 64, 2)
    q, k, v, _ = inputs(2, 40, 0)
    keys, values = cache.update(k, v, 0)
    kvbench_attention(FakeModule("sdpa", groups=2), q, keys, values, None, scaling=SCALING, kvbench_cache=cache)
    assert cache.layers[0].ragged is None and cache.layers[0].length == 40


def test_budget_at_most_the_window_keeps_the_last_tokens():
    cache = one_layer_cache(build({"name": "pyramidkv"}), 6, 2)
    q, k, v, _ = inputs(2, 40, 0)
    keys, values = cache.update(k, v, 0)
    kvbench_attention(FakeModule("sdpa", groups=2), q, keys, values, None, scaling=SCALING, kvbench_cache=cache)
    assert ragged_kept(cache.layers[0]) == [[list(range(34, 40))] * 2] * 2


def test_headwise_settings_are_checked(tmp_path):
    path = str(scores_file(tmp_path, [[1.0, 2.0]]))
    with pytest.raises(KVBenchError, match="prompt only"):
        build({"name": "headkv", "head_scores": path, "stage": "decode"})
    with pytest.raises(KVBenchError, match="method.variant=r3"):
        build({"name": "headkv", "head_scores": path, "variant": "r3"})
    with pytest.raises(KVBenchError, match="method.positions=original"):
        build({"name": "ada_snapkv", "positions": "shifted"})
    assert build({"name": "headkv", "head_scores": path, "variant": "r"}).label == "headkv-r"
    assert build({"name": "headkv", "head_scores": path, "beta": 5}).label == "headkv-r2-beta5"


# ----------------------------------------------------------------------------- the tiny model end to end


def test_headkv_generation_stores_the_sum_of_caps(tmp_path, tiny_gqa):
    from kvbench.models.generator import generate

    model, _ = tiny_gqa
    cfg = model.config
    importance = torch.rand(cfg.num_hidden_layers, cfg.num_attention_heads, generator=torch.Generator().manual_seed(3))
    path = scores_file(tmp_path, importance.tolist())
    method = build({"name": "headkv", "head_scores": str(path), "beta": 1.2})
    ids = torch.randint(4, 200, (1, 120), generator=torch.Generator().manual_seed(0))
    gen = generate(model, ids, method, Budget(tokens=40), max_new_tokens=6)
    caps = headkv_caps(importance.double(), cfg.num_key_value_heads, 40 - 8, 1.2)
    n_new = len(gen.tokens[0])
    decoded = n_new - 1  # the last generated token is never fed back
    assert gen.kv["kv_kept_per_layer_head"] == (caps + 8).tolist()  # the prompt: decoded tokens never count here
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert gen.kv["kv_kept_bytes"] == int((caps + 8).sum()) * 2 * head_dim * 4
    assert gen.kv["kv_full_tokens"] == cfg.num_hidden_layers * cfg.num_key_value_heads * 120
    assert gen.kv["kv_decoded_tokens"] == decoded
    assert gen.kv["kv_end_kept_tokens"] == int((caps + 8 + decoded).sum())


def test_budget_above_prompt_equals_full(tiny_gqa):
    from kvbench.models.generator import generate

    model, _ = tiny_gqa
    ids = torch.randint(4, 200, (1, 50), generator=torch.Generator().manual_seed(1))
    full = generate(model, ids, build({"name": "full"}), None, max_new_tokens=8)
    ada = generate(model, ids, build({"name": "ada_snapkv"}), Budget(tokens=64), max_new_tokens=8)
    assert ada.tokens == full.tokens


def run(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from kvbench.resources import CONFIG_DIR
    from kvbench.runner.run import execute

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", f"paths.results={tmp_path}", *overrides])
    return execute(cfg)


def test_headkv_runs_passkey_and_longbench_from_the_config(tmp_path, tiny_gqa):
    from tests.helpers import LONGBENCH_FIXTURES as FIXTURES

    model, _ = tiny_gqa
    cfg = model.config
    importance = torch.rand(cfg.num_hidden_layers, cfg.num_attention_heads, generator=torch.Generator().manual_seed(5))
    # the config's default path: <results>/head_scores/<model>_<variant>.json
    scores_file(tmp_path / "head_scores", importance.tolist(), name="tiny-random_r2.json")
    folder = run(tmp_path, "model=tiny-random", "method=headkv", "budget.tokens=64", "task.num_samples=2",
                 "task.context_tokens=300")
    assert folder.parts[-2] == "headkv-r2"
    # meta.json: prompt bytes stored = sum of the heads' caps x bytes per token, and the ratio over the prompt;
    # the decoded tokens are counted apart (they never inflate a head's budget)
    caps = headkv_caps(importance.double(), cfg.num_key_value_heads, 64 - 8, 1.005) + 8
    records = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    per_token = 2 * (cfg.hidden_size // cfg.num_attention_heads) * 4
    for record in records:
        assert torch.equal(torch.tensor(record["kv_kept_per_layer_head"]), caps)
        assert record["kv_decoded_tokens"] == record["n_new"] - 1
    kv = json.loads((folder / "meta.json").read_text())["kv"]
    assert kv["kv_kept_bytes"] == int(caps.sum()) * per_token * len(records)
    prompt_bytes = sum(r["n_prompt"] for r in records) * caps.numel() * per_token
    assert kv["kv_ratio"] == round(kv["kv_kept_bytes"] / prompt_bytes, 6) and kv["kv_ratio"] < 0.3
    assert kv["kv_kept_tokens_per_layer_head"] == caps.tolist() and kv["kv_prompt_only"]
    assert kv["kv_decoded_tokens"] == sum(r["n_new"] - 1 for r in records)
    folder = run(tmp_path, "model=tiny-random", "method=headkv", "budget.tokens=64", "task=longbench",
                 f"task.data_dir={FIXTURES}",
                 "task.limit=1", "model.max_prompt_tokens=512")
    assert (folder / "scores.json").exists()


# ----------------------------------------------------------------------------- head-score estimation


def test_step_scores_match_loops():
    from papers.head_scores import step_scores

    g = torch.Generator().manual_seed(0)
    rows = torch.softmax(torch.randn(3, 4, 30, generator=g) * 3, dim=-1)
    context = torch.randint(0, 5, (30,), generator=g)
    span = (14, 17)  # the needle's answer span: the only positions credited, divided by its length
    for token in range(5):
        r = step_scores(rows, token, context, span, "r")
        r2 = step_scores(rows, token, context, span, "r2")
        for layer in range(3):
            for head in range(4):
                row = rows[layer, head].tolist()
                top = max(range(30), key=lambda j: row[j])
                hit = 14 <= top < 17 and int(context[top]) == token
                assert float(r[layer, head]) == pytest.approx(1 / 3 if hit else 0.0)
                top3 = sorted(range(30), key=lambda j: row[j], reverse=True)[:3]  # top-k = the span's length
                expected = sum(row[j] for j in top3 if 14 <= j < 17) / 3
                assert float(r2[layer, head]) == pytest.approx(expected)


def test_prompt_spans_hold_the_answer_span(tiny_gqa):
    from papers.head_scores import BUFFER, HAYSTACK, NEEDLES, QUESTION, build_prompt

    _, tok = tiny_gqa
    haystack = tok(HAYSTACK.read_text(), add_special_tokens=False).input_ids
    for needle in NEEDLES["r"] + NEEDLES["r2"]:
        question = tok(QUESTION.format(question=needle.question), add_special_tokens=False).input_ids
        for depth in (0, 44, 100):
            ids, (a0, a1) = build_prompt(tok, haystack, needle, 800, depth)
            # [BOS] + (length - 200) tokens of haystack and needle + the raw question, no chat template
            assert ids[0] == tok.bos_token_id and len(ids) == 1 + 800 - BUFFER + len(question)
            assert tok.decode(ids[a0:a1]).strip() == needle.span
            assert tok.decode(ids).endswith(f"Question: {needle.question}\nAnswer:")
    ids, (a0, _) = build_prompt(tok, haystack, NEEDLES["r"][0], 800, 50)
    needle_start = tok.decode(ids).index(NEEDLES["r"][0].text)
    assert 100 < needle_start <= 260 and tok.decode(ids)[needle_start - 2:needle_start] == ". "  # back to a sentence end
    # length 0 (the official first length): the needle alone before the question
    ids, _ = build_prompt(tok, haystack, NEEDLES["r"][0], 0, 50)
    assert tok.decode(ids[1:]).startswith(" " + NEEDLES["r"][0].text)


def test_official_lengths_depths_and_success_tests():
    from papers.head_scores import NEEDLES, official_depths, official_lengths, succeeded

    assert official_lengths(0, 10000, 5, None) == [0, 2500, 5000, 7500, 10000]
    assert official_lengths(0, 10000, 5, 4096) == [0, 2500, 4096]  # capped at the model's length
    assert official_depths(10) == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
    needle = NEEDLES["r"][2]  # span: "a spoonful of smoked paprika and a squeeze of lemon" (10 words)
    # R: ROUGE-1 recall of the span (stemmed) > 50, not a substring test
    assert succeeded("r", "Smoked paprika, a spoonful, and lemons squeezed", needle)
    assert not succeeded("r", "A spoonful of lemon", needle)  # 4 of 10 words
    # R2: QA-F1 against the answer > 50
    r2 = NEEDLES["r2"][0]
    assert succeeded("r2", "Lena's hobby is building model ships from driftwood", r2)
    assert not succeeded("r2", "Tomas's hobby is growing giant pumpkins", r2)


def test_generation_stops_as_the_official_scripts(tiny_gqa, monkeypatch):
    import papers.head_scores as headscores
    from kvbench.engine.attention import attention_function

    model, tok = tiny_gqa
    newline = tok.encode("\n", add_special_tokens=False)[-1]
    ids = tok("Some words. Based on the content of the book, Question: x\nAnswer:").input_ids
    script = iter([])

    class Forced(torch.nn.Module):  # the model's attention, with the next tokens forced through the logits
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits[0, -1] = -1e9
            out.logits[0, -1, next(script)] = 0.0
            return out

    forced = Forced(model)
    with attention_function(model, headscores.PROBE, headscores.probe_attention):
        for variant, tokens, answer_tokens, expected in [
            ("r", [70, 71, tok.eos_token_id, 72, newline, 73], 99, 5),  # R: past EOS, stops at the newline
            ("r2", [70, tok.eos_token_id, 72], 99, 2),  # R2: stops at EOS
            ("r2", [70, 71, 72, 73], 3, 3),  # R2: stops at the answer's token count
            ("r", [70] * 60, 3, 50),  # at most max_new_tokens
        ]:
            script = iter(tokens)
            text, score = headscores.needle_run(forced, tok, ids, (1, 3), variant, 50, answer_tokens)
            assert len(tok(text, add_special_tokens=False).input_ids) <= expected
            assert score.shape == (model.config.num_hidden_layers, model.config.num_attention_heads)
            assert next(script, None) == (tokens[expected] if expected < len(tokens) else None), variant


@pytest.mark.slow
def test_estimation_script_writes_a_file_headkv_runs_with(tmp_path, tiny_gqa):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "head_scores"
    done = subprocess.run(
        [sys.executable, "scripts/estimate_head_scores.py", "model=tiny-random", "lengths=2", "depths=3", "min_length=400",
         "max_length=500", "max_new_tokens=4", "only_successful=false", f"output_dir={out}",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    model, _ = tiny_gqa
    for variant in ("r", "r2"):
        data = json.loads((out / f"tiny-random_{variant}.json").read_text())
        assert sorted(data) == sorted(f"{layer}-{h}" for layer in range(2) for h in range(4))
        needles = 3 if variant == "r" else 2
        assert all(len(v) == needles * 2 * 3 for v in data.values())  # needles x 2 lengths x 3 depths, all counted
        assert load_head_scores(out / f"tiny-random_{variant}.json").shape == (2, 4)
    assert sum(sum(v) for v in json.loads((out / "tiny-random_r2.json").read_text()).values()) > 0
    folder = run(tmp_path, "model=tiny-random", "method=headkv", "method.variant=r", "budget.tokens=48", "task.num_samples=1",
                 "task.context_tokens=300")
    assert folder.parts[-2] == "headkv-r" and (folder / "scores.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hkv", [32, 8])
def test_varlen_path_equals_sparse_fallback_on_gpu(hkv):
    from kvbench.engine import ragged

    if ragged.flash_attn_varlen_func is None:
        pytest.skip("needs flash-attn")
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d = 4096, 128
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    lens = torch.randint(8, 1024, (1, hkv, 1), device="cuda", generator=g)
    keep = torch.arange(n, device="cuda") >= n - lens  # ragged: the last lens[h] tokens of head h
    store = ragged.RaggedKV(k, v, keep, torch.arange(n, device="cuda").expand(1, hkv, n), reserve=16)
    for width in (1, 1, 3, 1):
        store.append(torch.randn(1, hkv, width, d, device="cuda", dtype=torch.bfloat16, generator=g),
                     torch.randn(1, hkv, width, d, device="cuda", dtype=torch.bfloat16, generator=g))
        query = torch.randn(1, 32, width, d, device="cuda", dtype=torch.bfloat16, generator=g)
        varlen = store._varlen(query, d**-0.5).float()
        fallback = store._sparse(query, d**-0.5).float()
        torch.testing.assert_close(varlen, fallback, atol=2e-2, rtol=2e-2)


def test_estimation_in_process_counts_runs_and_restores_attention(tiny_gqa):
    from papers.head_scores import estimate_head_scores

    model, tok = tiny_gqa
    before = model.config._attn_implementation
    scores, summary = estimate_head_scores(model, tok, "r2", [400], [0, 100], max_new_tokens=2,
                                           only_successful=False)
    assert model.config._attn_implementation == before
    assert summary == {"variant": "r2", "runs": 4, "successful": 0, "counted": 4}  # 2 needles x 2 depths
    assert len(scores) == 2 * 4 and all(len(v) == 4 for v in scores.values())
