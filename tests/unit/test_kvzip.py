"""KVzip (kvbench.methods.kvzip) against a brute-force reference written from kvpress's KVzipPress: the
prompt in a transformers DynamicCache, each reconstruction pass forwarded on it and cropped off again, the
pass's queries and keys recorded, the scores taken with explicit loops (softmax over the sinks, the chunk and
the pass's own keys), then one global ranking of every (layer, head, token)."""

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvbench.engine import Budget, Session
from kvbench.engine.batch import Request, decode_together
from kvbench.engine.types import RepeatPrompts
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.models.chat import chat_frame
from kvbench.models.generator import Generator
from tests.helpers import dot, ragged_kept, softmax

SINKS = 4


def repeat_prompts(prefix: int, seed: int = 3) -> RepeatPrompts:
    g = torch.Generator().manual_seed(seed)
    return RepeatPrompts(prefix, torch.randint(4, 128, (5,), generator=g), torch.randint(4, 128, (7,), generator=g),
                         torch.randint(4, 128, (2,), generator=g))


def reference_passes(ids, prompts, chunk_size, postfix):
    """kvpress's `prepare`: the context after the prefix in chunks; the first asks one prompt, the next ones
    the other followed by the previous chunk's last `postfix` tokens; then the suffix and the chunk."""
    context = ids[0].tolist()
    chunks = [context[i : i + chunk_size] for i in range(prompts.prefix, len(context), chunk_size)]
    passes, start = [], prompts.prefix
    for i, chunk in enumerate(chunks):
        ask = prompts.first.tolist() if i == 0 else prompts.later.tolist() + chunks[i - 1][-postfix:]
        passes.append((start, start + len(chunk), ask + prompts.suffix.tolist() + chunk))
        start += len(chunk)
    return passes


def reference_scores(model, ids, prompts, chunk_size, postfix):
    """scores[layer][kv head][position], as kvpress's score_val after every pass (explicit loops)."""
    records = {}

    def recording(module, query, key, value, mask, **kwargs):
        records[module.layer_idx] = (query[0].tolist(), key[0].tolist())
        q, k = query.shape[2], key.shape[2]  # a custom attention gets no mask it can trust: causal, bottom-right
        causal = torch.ones(q, k, dtype=torch.bool).tril(k - q)[None, None]
        return sdpa_attention_forward(module, query, key, value, causal, **kwargs)

    AttentionInterface.register("kvzip_reference", recording)
    previous = model.config._attn_implementation
    model.set_attn_implementation("kvzip_reference")
    config = model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    groups = config.num_attention_heads // kv_heads
    n = ids.shape[1]
    scores = [[[0.0] * n for _ in range(kv_heads)] for _ in range(layers)]
    for layer in scores:
        for head in layer:
            head[:SINKS] = [1.0] * SINKS
    try:
        with torch.no_grad():
            cache = DynamicCache(config=config)
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            for start, end, pass_ids in reference_passes(ids, prompts, chunk_size, postfix):
                q = len(pass_ids)
                model(input_ids=torch.tensor([pass_ids]), past_key_values=cache, use_cache=True,
                      position_ids=torch.arange(n, n + q)[None])
                cache.crop(-q)  # the pass leaves the cache (kvpress keeps its first context_length)
                sink = min(SINKS, start)
                for layer in range(layers):
                    queries, keys = records[layer]
                    for h in range(kv_heads):
                        for j in range(start, end):
                            best = 0.0
                            for g in range(groups):
                                for i in range(q):
                                    subset = list(range(sink)) + list(range(start, end)) + list(range(n, n + i + 1))
                                    probs = softmax([dot(queries[h * groups + g][i], keys[h][k]) / len(keys[h][k]) ** 0.5
                                                     for k in subset])
                                    best = max(best, probs[sink + j - start])
                            scores[layer][h][j] = best
    finally:
        model.set_attn_implementation(previous)
    return scores


def reference_kept(scores, budget, layerwise):
    """The tokens kept: the top C x heads x layers of every (layer, head, position) (per layer when
    `layerwise`), ties to the newer token, then the lower layer and head."""
    layers, heads, n = len(scores), len(scores[0]), len(scores[0][0])
    groups = [[layer] for layer in range(layers)] if layerwise else [list(range(layers))]
    kept = set()
    for group in groups:
        entries = [(scores[layer][h][j], layer, h, j) for layer in group for h in range(heads) for j in range(n)]
        entries.sort(key=lambda e: (-e[0], e[1], e[2], -e[3]))
        kept |= {(layer, h, j) for _, layer, h, j in entries[: budget * heads * len(group)]}
    return kept


def kvbench_kept(session):
    return {(layer.layer_idx, h, j) for layer in session.cache.layers for h, positions in enumerate(ragged_kept(layer)[0])
            for j in positions}


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("prefix", [0, 6])
@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
def test_kept_sets_equal_the_reference(fixture, prefix, layerwise, request):
    model = request.getfixturevalue(fixture)[0]
    ids = torch.randint(4, 128, (1, 45), generator=torch.Generator().manual_seed(7))
    prompts = repeat_prompts(prefix)
    budget, chunk_size, postfix = 12, 16, 8
    expected = reference_kept(reference_scores(model, ids, prompts, chunk_size, postfix), budget, layerwise)
    method = build({"name": "kvzip", "chunk_size": chunk_size, "prev_postfix": postfix, "layerwise": layerwise})
    passes = method.reconstruction_passes(ids, prompts)
    assert [(s, e, p[0].tolist()) for s, e, p in passes] == reference_passes(ids, prompts, chunk_size, postfix)
    session = Session(model, method, Budget(tokens=budget), reserve=4, repeat=prompts)
    with torch.inference_mode():
        session.prefill(ids)
    assert kvbench_kept(session) == expected
    summary = session.kv_summary()
    assert summary["kv_kept_tokens"] == budget * 2 * model.config.num_key_value_heads
    assert all(layer.seen == ids.shape[1] for layer in session.cache.layers)  # the passes left no token


def test_the_prompt_logits_and_kept_keys_are_the_full_cache_s(tiny_gqa):
    model = tiny_gqa[0]
    ids = torch.randint(4, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    method = build({"name": "kvzip", "chunk_size": 16})
    with torch.inference_mode():
        full = Session(model, build({"name": "full"}), reserve=4)
        full_logits = full.prefill(ids)
        session = Session(model, method, Budget(tokens=10), reserve=4, repeat=repeat_prompts(3))
        assert torch.equal(session.prefill(ids), full_logits)
        for layer, full_layer in zip(session.cache.layers, full.cache.layers):
            ragged = layer.ragged
            for h, positions in enumerate(ragged_kept(layer)[0]):
                start = int(ragged.cu_lens[h])
                stored = ragged.prefix_keys[start : start + len(positions)]
                assert torch.equal(stored, full_layer.keys[0, h, positions])
        assert torch.isfinite(session.step(ids[:, :1])).all()


def test_a_budget_above_the_prompt_is_the_full_cache_without_passes(tiny_gqa):
    model = tiny_gqa[0]
    ids = torch.randint(4, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        tokens = Session(model, build({"name": "kvzip"}), Budget(tokens=64), reserve=6).generate(ids, 6, []).tokens
        assert tokens == Session(model, build({"name": "full"}), reserve=6).generate(ids, 6, []).tokens


def test_batched_sequences_equal_each_alone(tiny_gqa):
    model = tiny_gqa[0]
    g = torch.Generator().manual_seed(1)
    prompts = repeat_prompts(2)
    method = {"name": "kvzip", "chunk_size": 16}
    requests = [Request(torch.randint(0, 128, (1, n), generator=g), 5, [], repeat=prompts) for n in (40, 23, 57)]
    together = dict(decode_together(model, requests, build(method), Budget(tokens=12), 3))
    for i, request in enumerate(requests):
        session = Session(model, build(method), Budget(tokens=12), reserve=5, repeat=prompts)
        assert together[i].tokens == session.generate(request.input_ids, 5, []).tokens[0]


def test_without_its_prompts_it_stops_with_one_line(tiny_gqa):
    ids = torch.randint(4, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    with pytest.raises(KVBenchError, match="repeat_prompts"):
        Session(tiny_gqa[0], build({"name": "kvzip"}), Budget(tokens=8)).prefill(ids)


@pytest.mark.parametrize("setting", [{"chunk": 4}, {"critical": True}, {"key_channels": 0.5}, {"gqa": "expand"},
                                     {"stage": "decode"}, {"chunk_size": 0}])
def test_settings_it_cannot_take_are_refused(setting):
    with pytest.raises(KVBenchError):
        build({"name": "kvzip", **setting})


def test_the_chat_frame_is_kvpress_s_split():
    assert chat_frame("none") == ("", "\n")
    assert chat_frame("llama2") == ("[INST]", "[/INST]")
    opening, suffix = chat_frame("vicuna")
    assert opening.endswith(" USER: ") and suffix == " ASSISTANT:"

    class Template:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<s><|user|>{messages[0]['content']}<|end|><|assistant|>"

    assert chat_frame("tokenizer", Template()) == ("<s><|user|>", "<|end|><|assistant|>")


def test_the_generator_gives_its_prompts_and_the_opening_s_length(tiny_gqa):
    model, tokenizer = tiny_gqa
    generator = Generator(model, tokenizer, build({"name": "kvzip"}), Budget(tokens=16), chat_format="llama2")
    prompt = generator.prompt("a fairly long context " * 4, 4)
    prompts = generator.repeat_prompts(prompt.input_ids)
    opening = generator.encode("[INST]")[0]
    assert prompts.prefix == len(opening) and torch.equal(prompt.input_ids[0, : prompts.prefix], opening)
    plain = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    assert prompts.first.tolist() == plain("\n\nRepeat the previous context exactly.")
    assert prompts.suffix.tolist() == plain("[/INST]")
    assert Generator(model, tokenizer, build({"name": "snapkv"})).repeat_prompts(prompt.input_ids) is None
    generation = generator.run(prompt)
    assert generation.kv["kv_kept_tokens"] == 16 * 2 * model.config.num_key_value_heads


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_stays_finite(dtype):
    from kvbench.models import load
    from tests.conftest import tiny_cfg

    model = load({**tiny_cfg(), "dtype": dtype})[0]
    ids = torch.randint(4, 128, (1, 60), generator=torch.Generator().manual_seed(9))
    for tokens in (1, 5, 200):
        session = Session(model, build({"name": "kvzip", "chunk_size": 16}), Budget(tokens=tokens), reserve=6,
                          repeat=repeat_prompts(2))
        with torch.inference_mode():
            logits = session.prefill(ids)[:, -1]
            for _ in range(6):
                assert torch.isfinite(logits).all(), (dtype, tokens)
                logits = session.step(logits.argmax(-1)[:, None])[:, -1]
        assert torch.isfinite(logits).all(), (dtype, tokens)
        assert session.kv_summary()["kv_kept_tokens"] == 2 * 2 * (min(tokens, 60) + 6)


def test_driven_without_a_session_it_stops_with_one_line(tiny_gqa):
    from kvbench.engine import CompressedCache
    from kvbench.engine.session import forward

    cache = CompressedCache(tiny_gqa[0], build({"name": "kvzip"}), Budget(tokens=8))
    with pytest.raises(KVBenchError, match="Session"), torch.inference_mode():
        forward(tiny_gqa[0], cache, torch.randint(4, 128, (1, 30)))


def test_the_python_api_passes_its_prompts(tiny_gqa):
    import kvbench
    from kvbench.models.chat import repeat_prompts

    model, tokenizer = tiny_gqa
    ids = torch.randint(4, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    prompts = repeat_prompts(tokenizer, build({"name": "kvzip"}), ids)
    with kvbench.compress(model, method="kvzip", budget=10, repeat=prompts, chunk_size=16) as session:
        session.generate(ids, 3, [])
        assert session.kv_summary()["kv_kept_tokens"] == 2 * 2 * (10 + 2)
