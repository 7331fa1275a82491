"""The math reasoning task (kvbench/tasks/reasoning.py): boxed-answer extraction, math-verify equivalence on
tricky answers, MATH-500 / AIME rows from local files, the error lines, and runs through the tiny model."""

import json
import sys
from pathlib import Path

import pytest

from kvbench.engine import Budget
from kvbench.errors import KVBenchError
from kvbench.tasks import build, limit_samples
from kvbench.tasks.reasoning import INSTRUCTION, equivalent, final_text, last_boxed

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "reasoning"
MATH500 = FIXTURES / "math500.jsonl"
AIME25 = FIXTURES / "aime25.jsonl"
CASES = [json.loads(line) for line in (FIXTURES / "equivalence.jsonl").read_text().splitlines()]


def task(**settings):
    return build({"name": "math", "dataset": "math500", "data_path": str(MATH500), **settings})


@pytest.mark.parametrize("case", CASES, ids=[c["why"] for c in CASES])
def test_tricky_answers(case):
    answer = last_boxed(final_text(case["prediction"])[0])
    assert equivalent(case["gold"], answer) is case["correct"]


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{\\frac{a}{b}} and \\boxed{\\left\\{1, \\frac{2}{3}\\right\\}}") == "\\left\\{1, \\frac{2}{3}\\right\\}"
    assert last_boxed("\\boxed{\\{1\\}}") == "\\{1\\}"  # escaped braces do not close the box
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no box") is None and last_boxed("\\boxed") is None and last_boxed("\\boxed{ }") is None
    assert final_text("<think>a</think>b") == ("b", True)
    assert final_text("<think>a") == ("<think>a", False) and final_text("a") == ("a", None)


def test_math500_and_aime_rows_load_from_files(tmp_path):
    samples = task().samples()
    assert [s["id"] for s in samples][:2] == ["math500/test/precalculus/807.json", "math500/test/algebra/2592.json"]
    first = samples[0]
    assert first["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)" and first["subject"] == "Precalculus" and first["level"] == 2
    aime = build({"name": "math", "dataset": "aime25", "data_path": str(AIME25)})
    assert [(s["id"], s["answer"], s["level"]) for s in aime.samples()] == [("aime25/0", "70", None), ("aime25/2", "117", None)]
    assert aime.label == "aime25" and task().label == "math500"
    assert limit_samples(aime, aime.samples(), 1) == aime.samples()[:1]

    import pandas as pd

    rows = [json.loads(line) for line in MATH500.read_text().splitlines()]
    pd.DataFrame(rows).to_parquet(tmp_path / "math500.parquet")
    assert task(data_path=str(tmp_path / "math500.parquet")).samples() == samples


def test_error_lines(tmp_path, monkeypatch):
    with pytest.raises(KVBenchError, match="task.dataset=gsm8k is not one of: math500, aime24, aime25"):
        build({"name": "math", "dataset": "gsm8k"})
    with pytest.raises(KVBenchError, match="must hold \\{problem\\}"):
        task(template="Solve it.")
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(KVBenchError, match=f"{missing} does not exist; write it online with `HF_HUB_OFFLINE=0 python -c "):
        task(data_path=str(missing)).samples()
    with pytest.raises(KVBenchError, match="give a .jsonl or .parquet file"):
        task(data_path=str(tmp_path / "x.csv")).samples()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1+1?", "answer": "2", "unique_id": "a"}) + "\n" + json.dumps({"problem": "2+2?"}) + "\n")
    with pytest.raises(KVBenchError, match=f"^{bad} line 2: no 'answer'; each row needs problem"):
        task(data_path=str(bad)).samples()
    bad.write_text("{not json\n")
    with pytest.raises(KVBenchError, match=f"^{bad} line 1 is not JSON .*; fix or delete that line$"):
        task(data_path=str(bad)).samples()
    bad.write_text(json.dumps({"answer": "2"}) + "\n")
    with pytest.raises(KVBenchError, match="line 1: no 'problem' text"):
        task(data_path=str(bad)).samples()

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KVBenchError) as err:
        build({"name": "math", "dataset": "math500"}).samples()
    assert str(err.value) == (
        "HuggingFaceH4/MATH-500 (split test) is not in the datasets cache and HF_HUB_OFFLINE=1: run "
        "`HF_HUB_OFFLINE=0 python -c \"import datasets; datasets.load_dataset('HuggingFaceH4/MATH-500', split='test')\"` "
        "once online, or set task.data_path to a "
        "local .jsonl/.parquet with columns problem and answer"
    )
    assert "\n" not in str(err.value)

    monkeypatch.setitem(sys.modules, "math_verify", None)  # not installed
    with pytest.raises(KVBenchError, match="math-verify, which is not installed: pip install 'kvbench\\[math\\]'$"):
        task()


def generator(tiny_gqa, method=None, budget=None, **kwargs):
    from kvbench.methods import build as build_method
    from kvbench.models.generator import Generator

    model, tok = tiny_gqa
    return Generator(model, tok, build_method(method or {"name": "full"}), budget, **kwargs)


def test_record_scores_the_answer_after_thinking_and_keeps_the_thinking(tiny_gqa):
    from kvbench.models.generator import Generation

    gen = generator(tiny_gqa)
    t = build({"name": "math", "dataset": "aime25", "data_path": str(AIME25), "max_new_tokens": 200})
    sample = t.samples()[0]
    prompt = t.prepare(sample, gen)
    text = "<think>17_b = b+7, maybe \\boxed{71}</think>The sum is \\boxed{70}."
    tokens = gen.tokenizer(text, add_special_tokens=False).input_ids
    record = t.record(sample, prompt, Generation(tokens=[tokens], prompt_tokens=9, seconds=1.0, kv={"kv_peak_tokens": 80}), gen)
    assert record["prediction"] == text and record["extracted"] == "70" and record["score"] == 1.0
    assert record["thinking_closed"] is True and record["answers"] == ["70"] and record["kv_peak_tokens"] == 80
    assert record["hit_max_new_tokens"] is False and record["n_new"] == len(tokens)
    wrong = {**record, "score": 0.0, "extracted": None, "hit_max_new_tokens": True, "n_new": 200}
    assert t.score([record, wrong]) == {"aime25": 50.0}
    assert t.score_details([record, wrong]) == {"answered": 50.0, "hit_max_new_tokens": 50.0,
                                                "mean_new_tokens": (len(tokens) + 200) / 2}


def test_end_to_end_through_the_tiny_model_batched_and_decode_stage(tiny_gqa):
    t = task(max_new_tokens=6)
    samples = t.samples()[:3]
    gen = generator(tiny_gqa)
    records = [t.evaluate(s, gen) for s in samples]
    for record, sample in zip(records, samples):
        assert record["id"] == sample["id"] and record["task"] == "math500" and record["score"] in (0.0, 1.0)
        assert record["n_new"] <= 6 and {"kv_kept_tokens", "kv_end_kept_tokens", "kv_peak_tokens"} <= set(record)
    assert set(t.score(records)) == {"math500"} and set(t.score_details(records)["by_level"]) == {"1", "2"}
    prompts = [t.prepare(s, gen) for s in samples]
    batched = {i: t.record(samples[i], p, g, gen) for i, p, g in gen.run_many(prompts, batch_size=3)}
    drop = ("seconds", "prefill_seconds")
    assert [{k: v for k, v in batched[i].items() if k not in drop} for i in range(3)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in records]

    h2o = generator(tiny_gqa, {"name": "h2o", "stage": "decode"}, Budget(tokens=16))
    record = t.evaluate(samples[1], h2o)  # a decode-stage method evicts while generating: it holds the budget
    heads = 2 * 2  # kv_* count tokens over every layer and KV head of the tiny model
    assert record["kv_end_kept_tokens"] == 16 * heads < record["kv_peak_tokens"] <= record["n_prompt"] * heads


def test_chat_template_thinking_and_question(tiny_gqa):
    from transformers import AutoTokenizer

    from kvbench.resources import ASSETS_DIR

    tok = AutoTokenizer.from_pretrained(str(ASSETS_DIR / "byte_tokenizer"))
    tok.chat_template = ("{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
                         "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
    gen = generator((tiny_gqa[0], tok), chat_format="tokenizer", chat_template_kwargs={"enable_thinking": False})
    sample = task().samples()[1]
    seen = []
    encode = gen.encode
    gen.encode = lambda text: seen.append(text) or encode(text)
    prompt = task().prepare(sample, gen)
    assert seen[0] == f"<u>{sample['problem']}\n{INSTRUCTION}</u><a>"  # task.thinking=true wins
    seen.clear()
    task(thinking=None).prepare(sample, gen)
    assert seen[0].endswith("<a><think></think>")  # null: the model config's enable_thinking=false
    question = tok.decode(prompt.input_ids[0, prompt.question_start:])
    assert question.startswith(sample["problem"][:20])  # query-agnostic: the whole message is the question
    assert task(chat=False).prepare(sample, gen).input_ids.shape[1] < prompt.input_ids.shape[1]


def test_greedy_by_default_sampling_seeded_per_problem(tiny_gqa):
    gen = generator(tiny_gqa)
    sample = task().samples()[0]
    assert task().prepare(sample, gen).sampling is None
    hot = task(temperature=0.6, top_p=0.95, top_k=20, seed=1)
    first, again = hot.prepare(sample, gen).sampling, hot.prepare(sample, gen).sampling
    assert (first.temperature, first.top_p, first.top_k) == (0.6, 0.95, 20) and first.seed == again.seed
    assert task(temperature=0.6, seed=2).prepare(sample, gen).sampling.seed != first.seed
    with pytest.raises(KVBenchError, match="task.temperature must be >= 0"):
        task(temperature=-1)


def test_configs_compose_to_the_math_task():
    from hydra import compose, initialize_config_dir

    from kvbench.resources import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for name, dataset, tokens in (("math500", "math500", 8192), ("aime25", "aime25", 32768)):
            cfg = compose("config", overrides=[f"task={name}"]).task
            built = build({k: v for k, v in cfg.items()})
            assert (built.name, built.dataset, built.max_new_tokens, built.temperature) == ("math", dataset, tokens, 0.0)
            assert built.template == "{problem}\n" + INSTRUCTION
