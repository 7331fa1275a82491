"""Query-agnostic compression (`method.query=agnostic`, issue 24): the context is compressed alone, then the
question is appended uncompressed. Its tokens are never evicted and never scored: the kept context equals the
method run on the context alone, and every question token is in every head's cache."""

import pytest
import torch
from transformers import AutoTokenizer

from kvbench.engine import Budget, Session, install
from kvbench.engine.batch import Request, decode_together
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.models.families import tiny_model
from kvbench.models.generator import Generator
from kvbench.resources import ASSETS_DIR
from tests.helpers import ragged_kept

CONTEXT, QUESTION, NEW = 48, 9, 6


@pytest.fixture(scope="module")
def model():
    model = tiny_model("llama", num_key_value_heads=2)
    install(model)
    return model


def ids(n, seed):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def positions(session):
    """Kept positions per (layer, kv head) of sequence 0, as sets."""
    out = []
    for layer in session.cache.layers:
        if layer.ragged is not None:
            decoded = set(range(layer.seen - layer.ragged.decoded, layer.seen))
            out.append([set(p) | decoded for p in ragged_kept(layer)[0]])
        else:
            out.append([set(row.tolist()) for row in layer.view("pos")[0]])
    return out


@pytest.mark.parametrize("settings", [{"name": "snapkv", "window": 8}, {"name": "h2o", "stage": "prefill"},
                                      {"name": "tova", "stage": "prefill"}, {"name": "knorm"},
                                      {"name": "streamingllm", "stage": "prefill"},
                                      {"name": "knorm", "heads": "ada"}])
def test_question_is_never_scored_nor_evicted(model, settings):
    context, question = ids(CONTEXT, 0), ids(QUESTION, 1)
    budget = Budget(tokens=20)
    agnostic = Session(model, build({**settings, "query": "agnostic"}), budget, reserve=QUESTION + NEW)
    agnostic.prompt(context, question)
    alone = Session(model, build(settings), budget, reserve=NEW)
    alone.prompt(context)
    asked = set(range(CONTEXT, CONTEXT + QUESTION))
    for got, ref in zip(positions(agnostic), positions(alone)):
        for head_got, head_ref in zip(got, ref):
            assert head_got & asked == asked  # every question token kept in every head
            assert head_got - asked == head_ref  # the context kept as if the question did not exist


def test_query_aware_scores_with_the_question(model):
    """The same prompt, query-aware: SnapKV's window is the question's end, so the kept sets differ."""
    prompt = torch.cat([ids(CONTEXT, 0), ids(QUESTION, 1)], dim=1)
    aware = Session(model, build({"name": "snapkv", "window": 8}), Budget(tokens=20))
    aware.prompt(prompt)
    agnostic = Session(model, build({"name": "snapkv", "window": 8, "query": "agnostic"}), Budget(tokens=20))
    agnostic.prompt(prompt[:, :CONTEXT], prompt[:, CONTEXT:])
    assert positions(aware) != positions(agnostic)


def test_full_cache_tokens_equal_query_aware(model):
    prompt = torch.cat([ids(CONTEXT, 0), ids(QUESTION, 1)], dim=1)
    aware = Session(model, build({"name": "full"})).generate(prompt, NEW).tokens
    agnostic = Session(model, build({"name": "full", "query": "agnostic"})).generate(
        prompt[:, :CONTEXT], NEW, question_ids=prompt[:, CONTEXT:]).tokens
    assert aware == agnostic


def test_batched_agnostic_equals_batch_one(model):
    method = build({"name": "snapkv", "window": 8, "query": "agnostic"})
    requests = [Request(ids(n, n), NEW, [5], 0, ids(q, q + 100)) for n, q in [(40, 7), (31, 12), (52, 3), (44, 9)]]
    together = dict(decode_together(model, requests, method, Budget(tokens=16), batch_size=3))
    for i, r in enumerate(requests):
        alone = Session(model, method, Budget(tokens=16), reserve=NEW + r.question_ids.shape[1])
        assert together[i].tokens == alone.generate(r.input_ids, NEW, [5], question_ids=r.question_ids).tokens[0]


def test_generator_marks_where_the_question_starts():
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")
    model = tiny_model("llama", vocab_size=len(tokenizer))
    install(model)
    generator = Generator(model, tokenizer, build({"name": "snapkv", "window": 8, "query": "agnostic"}), Budget(tokens=16))
    question = "\nWhat is the pass key? The pass key is"
    text = "The sky is blue. " * 12 + "The pass key is 12345. " + "The grass is green. " * 6 + question
    prompt = generator.prompt(text, 4, chat=False, question=question, answer_prefix=" Answer:")
    assert prompt.input_ids.equal(generator.encode(text + " Answer:"))
    asked = generator.decode(prompt.input_ids[0, prompt.question_start:].tolist())
    assert asked.strip().startswith(question.strip()[:10]) and asked.endswith(" Answer:")
    assert len(generator.encode(text[: -len(question)])[0]) - 1 <= prompt.question_start  # nothing of the context lost
    context, appended = prompt.parts("agnostic")
    assert torch.cat([context, appended], dim=1).equal(prompt.input_ids)
    generation = generator.run(prompt)
    assert generation.prompt_tokens == prompt.input_ids.shape[1]
    assert generation.kv["kv_peak_tokens"] >= generation.kv["kv_end_kept_tokens"]


def test_agnostic_needs_a_question_and_a_prefill_stage(model):
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")
    generator = Generator(model, tokenizer, build({"name": "snapkv", "query": "agnostic"}), Budget(tokens=16))
    with pytest.raises(KVBenchError, match="marks no question"):
        generator.run(generator.prompt("no question here", 2, chat=False))
    with pytest.raises(KVBenchError, match="method.stage=prefill"):
        build({"name": "h2o", "query": "agnostic"})  # h2o evicts while decoding by default
    with pytest.raises(KVBenchError, match="method.query=sometimes"):
        build({"name": "snapkv", "query": "sometimes"})
    assert build({"name": "snapkv", "query": "agnostic"}).run_label == "snapkv-agnostic"


def test_peak_kv_of_prefill_and_decode_stages(model):
    prompt = ids(CONTEXT, 0)
    prefill = Session(model, build({"name": "streamingllm", "stage": "prefill"}), Budget(tokens=20), reserve=NEW)
    prefill.generate(prompt, NEW)
    decode = Session(model, build({"name": "streamingllm", "stage": "decode"}), Budget(tokens=20), reserve=NEW)
    decode.generate(prompt, NEW)
    layers, heads = len(prefill.cache.layers), 2
    assert prefill.kv_summary()["kv_peak_tokens"] == layers * heads * CONTEXT  # the uncompressed prompt
    assert decode.kv_summary()["kv_peak_tokens"] == layers * heads * CONTEXT
    assert decode.kv_summary()["kv_kept_tokens"] == layers * heads * 20  # held at the budget while decoding
    grown = Session(model, build({"name": "full"}), reserve=NEW)
    grown.generate(prompt, NEW)
    assert grown.kv_summary()["kv_peak_tokens"] == grown.kv_summary()["kv_kept_tokens"] > layers * heads * CONTEXT


def test_tasks_mark_their_question():
    """Passkey, multi-key and every LongBench task mark the text after their context as the question."""
    from kvbench.tasks import LongBench, MultiKey, Passkey
    from tests.helpers import LONGBENCH_FIXTURES

    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")
    generator = Generator(None, tokenizer, build({"name": "snapkv", "query": "agnostic"}), max_prompt_tokens=4000)
    for task in (Passkey(num_samples=2, context_tokens=600), MultiKey(num_samples=2, context_tokens=600)):
        for sample in task.samples(tokenizer):
            prompt = task.prepare(sample, generator)
            asked = generator.decode(prompt.input_ids[0, prompt.question_start:].tolist())
            assert asked.strip() == sample["question"].strip()
    longbench = LongBench(data_dir=str(LONGBENCH_FIXTURES), download=False)
    samples = longbench.samples(tokenizer)
    for sample in samples:
        prompt = longbench.prepare(sample, generator)
        context, question = prompt.parts("agnostic")
        assert 0 < context.shape[1] < prompt.input_ids.shape[1]
        assert sample["input"][-20:].strip() in generator.decode(question[0].tolist()) or not sample["input"].strip()
    assert {s["task"] for s in samples} == set(__import__("kvbench.tasks.longbench", fromlist=["TASKS"]).TASKS)


def test_sampling_is_seeded_and_batched_alike(model):
    """Sampling (temperature, top-k, top-p): the same seed draws the same tokens alone, again, and in a batch;
    another seed draws others; top_k=1 is greedy."""
    from kvbench.engine import Sampling

    method, budget = build({"name": "snapkv", "window": 8}), Budget(tokens=16)
    requests = [Request(ids(n, n), 12, [], 0, None, Sampling(temperature=1.3, top_p=0.9, top_k=50, seed=n))
                for n in (40, 31, 52)]
    together = dict(decode_together(model, requests, method, budget, batch_size=3))
    for i, r in enumerate(requests):
        alone = Session(model, method, budget, reserve=12).generate(r.input_ids, 12, sampling=r.sampling).tokens[0]
        again = Session(model, method, budget, reserve=12).generate(r.input_ids, 12, sampling=r.sampling).tokens[0]
        assert together[i].tokens == alone == again
    other = Session(model, method, budget, reserve=12).generate(requests[0].input_ids, 12,
                                                                sampling=Sampling(1.3, 0.9, 50, seed=99)).tokens[0]
    assert other != together[0].tokens
    greedy = Session(model, method, budget, reserve=12).generate(requests[0].input_ids, 12).tokens[0]
    assert Session(model, method, budget, reserve=12).generate(
        requests[0].input_ids, 12, sampling=Sampling(top_k=1, seed=5)).tokens[0] == greedy


def test_top_p_keeps_the_smallest_set_over_p():
    from kvbench.engine import Sampling

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = {int(Sampling(top_p=0.75, seed=s).draw(probs.log())) for s in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.75 <= 0.8: the first two tokens, never the others
