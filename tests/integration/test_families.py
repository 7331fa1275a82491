"""Today's decoder families (issue 21): at a budget above everything it holds, every method gives the
model's own logits and `generate` tokens; at a small budget, the statistics each method receives equal a
dense float64 reference of the family's attention (window, softcap, sinks) on the keys the cache holds."""

import pytest
import torch
from transformers import AttentionInterface

from kvbench.check import write_random_head_scores
from kvbench.engine import Budget, Session, install
from kvbench.engine.attention import kvbench_attention
from kvbench.methods import build
from kvbench.models.families import FAMILIES, compare_with_model, method_variants, tiny_model

PROMPT, NEW = 40, 8  # the tiny families' windows are 12 tokens


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(1, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_above_its_budget_is_the_model_itself(family, prompt, tmp_path):
    model = tiny_model(family)
    config = model.config
    scores = write_random_head_scores(tmp_path / "h.json", config.num_hidden_layers, config.num_attention_heads)
    variants = method_variants(scores)
    assert {"full", "streamingllm+shifted", "h2o", "snapkv", "headkv", "weightedkv"} <= set(variants)
    failures = []
    for name, settings in variants.items():
        row = compare_with_model(model, settings, prompt, NEW, budget=PROMPT + NEW + 8)
        if row["max_logit_diff"] > 1e-5 or not row["same_tokens"]:
            failures.append((name, row["max_logit_diff"], row["same_tokens"]))
    assert not failures, f"{family}: {failures}"


def dense_probs(query, key, scaling, window, softcap, sinks, q_pos, key_pos):
    """float64 softmax of every query on every key, masked by positions; (B, Hq, q, kv)."""
    groups = query.shape[1] // key.shape[1]
    key = key.double().repeat_interleave(groups, dim=1)
    key_pos = key_pos.repeat_interleave(groups, dim=1)[:, :, None, :]  # (B, Hq, 1, kv)
    logits = query.double() @ key.transpose(2, 3) * scaling
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    p = q_pos[None, None, :, None]
    visible = (key_pos <= p) & ((key_pos > p - window) if window else True)
    logits = logits.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.double().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
        return torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("family", ["mistral_window", "gemma2", "gemma3_text", "gpt_oss"])
@pytest.mark.parametrize("method", [{"name": "h2o"}, {"name": "snapkv", "window": 4}, {"name": "tova"},
                                    {"name": "weightedkv"}])
def test_statistics_are_the_familys_attention(family, method, prompt):
    model = tiny_model(family)
    install(model, "sdpa")
    checked = []

    def recording(module, query, key, value, mask, scaling=None, kvbench_cache=None, **kwargs):
        layer = kvbench_cache.layers[module.layer_idx]
        key_pos, seen = layer.view("pos").clone(), layer.seen
        original = kvbench_cache.after_attention

        def check(layer_idx, stats):
            q_pos = torch.arange(seen - query.shape[2], seen)
            probs = dense_probs(query, key, scaling, kwargs.get("sliding_window"), kwargs.get("softcap"),
                                kwargs.get("s_aux"), q_pos, key_pos)
            per_kv = probs.view(probs.shape[0], key.shape[1], -1, *probs.shape[2:])  # (B, Hkv, G, q, kv)
            if stats.colsum is not None:
                torch.testing.assert_close(stats.colsum.double(), per_kv.sum(dim=3).mean(dim=2), atol=1e-5, rtol=1e-5)
            if stats.row is not None:
                expected = per_kv[:, :, :, -1].mean(dim=2) if query.shape[2] == 1 else per_kv.sum(dim=3).mean(dim=2)
                torch.testing.assert_close(stats.row.double(), expected, atol=1e-5, rtol=1e-5)
            if stats.window is not None:
                w = build(method).stats_request("prefill").window
                expected = per_kv[:, :, :, -w:].mean(dim=3).mean(dim=2)
                torch.testing.assert_close(stats.window.double(), expected, atol=1e-5, rtol=1e-5)
            checked.append((layer_idx, stats.colsum is not None, stats.row is not None, stats.window is not None))
            kvbench_cache.after_attention = original
            original(layer_idx, stats)

        kvbench_cache.after_attention = check
        return kvbench_attention(module, query, key, value, mask, scaling=scaling, kvbench_cache=kvbench_cache,
                                 **kwargs)

    AttentionInterface.register("kvbench", recording)
    try:
        session = Session(model, build(method), Budget(tokens=6), reserve=NEW)
        session.generate(prompt, max_new_tokens=NEW)
        kept = session.kv_summary()["kv_layer_types"]
        if build(method).stage == "decode":  # a token that left the window is evicted before any other
            for layer in session.cache.layers:
                if layer.window:
                    assert bool((layer.view("pos") > layer.seen - layer.window).all()), layer.layer_idx
    finally:
        AttentionInterface.register("kvbench", kvbench_attention)
    assert any(c[1] or c[2] or c[3] for c in checked)
    stage_room = 0 if build(method).stage == "decode" else NEW  # a prefill-stage method's cache grows
    assert kept.get("full_attention", {"kept_per_head": 0})["kept_per_head"] <= 6 + stage_room
    assert kept["sliding_attention"]["kept_per_head"] <= min(6 + stage_room, 11)  # never past the window


def test_kvbench_calls_raise_no_deprecation_warning(tmp_path):
    """transformers 5.25 deprecates `past_key_values` (removed in 5.40): kvbench passes the cache under the
    name the installed version takes, so none of its calls warns (the warnings are errors here)."""
    import warnings

    import kvbench

    model = tiny_model("gemma3_text")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with kvbench.compress(model, method="h2o", budget=8) as session:
            session.generate(torch.randint(1, 128, (1, 30)), max_new_tokens=4)
        result = kvbench.evaluate("tiny", method="snapkv", budget=64, task="passkey", results=tmp_path,
                                  task__limit=2)
    assert result.scores["n"] == 2


@pytest.mark.parametrize("model", ["tiny-gemma3", "tiny-gpt-oss"])
@pytest.mark.parametrize("method", ["h2o", "snapkv"])
def test_meta_json_states_budget_and_kept_tokens_per_layer_type(model, method, tmp_path):
    """A sliding layer (window 64) keeps at most its last 63 tokens, as the model does; a budget under that
    is applied inside the window; a full layer keeps the budget."""
    import json

    import kvbench

    for budget, sliding in ((32, 32), (128, 63)):
        result = kvbench.evaluate(model, method=method, budget=budget, task="passkey", results=tmp_path,
                                  task__limit=1)
        kv = json.loads((result.path / "meta.json").read_text())["kv"]
        kinds = kv["kv_layer_types"]
        (record,) = [json.loads(line) for line in (result.path / "predictions.jsonl").read_text().splitlines()]
        # a full cache as the model keeps it: a sliding layer holds its last 63 tokens (2 KV heads per layer)
        full = 2 * (kinds["sliding_attention"]["layers"] * 63 + kinds["full_attention"]["layers"] * record["n_prompt"])
        assert kv["kv_full_tokens"] == full and record["n_prompt"] > 63
        assert kinds["sliding_attention"] == {"layers": kinds["sliding_attention"]["layers"], "window": 64,
                                              "budget": sliding, "kept_per_head": float(sliding)}
        assert kinds["full_attention"]["budget"] == budget and kinds["full_attention"]["kept_per_head"] == budget


@pytest.mark.parametrize("family,layer_type", [("gemma3_text", "sliding_attention"), ("gemma3_text", "full_attention"),
                                               ("gpt_oss", "sliding_attention"), ("llama", "full_attention")])
def test_shifted_positions_rotate_a_key_with_its_layer_types_rope(family, layer_type):
    """`positions=shifted` moves a stored key from position p to p + d: the result must be the key the model
    itself rotates at p + d, with Gemma 3's RoPE of that layer type (local base 10k, global 1M) and
    gpt-oss's half-width cos/sin tables."""
    import importlib

    from kvbench.engine import CompressedCache

    model = tiny_model(family)
    rotary = model.model.rotary_emb
    module = importlib.import_module(type(model).__module__)
    per_type = hasattr(rotary, f"{layer_type}_inv_freq")
    raw = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    at = torch.tensor([[3, 7, 11, 20, 40]])
    moved = torch.tensor([[-2, 5, -11, 0, 17]])

    def rope(positions):
        cos, sin = rotary(raw, positions, layer_type) if per_type else rotary(raw, positions)
        return module.apply_rotary_pos_emb(raw, raw, cos, sin)[1]

    cache = CompressedCache(model, build({"name": "streamingllm", "positions": "shifted"}), Budget(tokens=8))
    got = cache.rotate(rope(at), moved.expand(2, -1)[None], layer_type)
    torch.testing.assert_close(got, rope(at + moved), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gemma3_text", "gpt_oss"])
def test_streamingllm_on_a_sliding_layer_keeps_the_newest_tokens_no_sinks(family, prompt):
    """The sinks left a sliding layer's window: there StreamingLLM keeps the newest `budget` tokens; a full
    layer keeps its 4 sinks and the recent window."""
    model = tiny_model(family)
    install(model, "sdpa")
    session = Session(model, build({"name": "streamingllm", "stage": "decode"}), Budget(tokens=8), reserve=NEW)
    session.generate(prompt, max_new_tokens=NEW)
    for layer in session.cache.layers:
        kept = sorted(layer.view("pos")[0, 0].tolist())
        seen = layer.seen
        assert kept == (list(range(seen - 8, seen)) if layer.window else [0, 1, 2, 3, *range(seen - 4, seen)])
