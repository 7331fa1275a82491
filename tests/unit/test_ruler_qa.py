"""RULER's qa_1 / qa_2 (kvbench.tasks.ruler_qa): generate_qa gives the records NVIDIA/RULER's own qa.py wrote
(tests/fixtures/ruler_qa/reference, README there), from RULER's files or the hub's rows; kvpress's pre-built set
loads with the text kvpress prompts; bad data, offline data and lengths RULER never finishes are one line."""

import json
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from kvbench.errors import KVBenchError
from kvbench.models.chat import wrap_chat
from kvbench.resources import ASSETS_DIR
from kvbench.tasks.ruler_qa import generate_qa, load_kvpress

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ruler_qa"
# reference file: (dataset, max_seq_length, pre_samples, seed) as prepare.py ran qa.py (README)
REFERENCES = {
    "qa_1_1024": ("squad", 1024, 0, 42),  # 15 documents do not fit: each sample steps down to 5
    "qa_1_2048": ("squad", 2048, 0, 42),  # more documents than the file has: repeated
    "qa_2_1024": ("hotpotqa", 1024, 0, 42),
    "qa_2_2048": ("hotpotqa", 2048, 0, 42),
    "qa_1_1024_chunk1of2": ("squad", 1024, 3, 43),  # prepare.py --chunk_idx 1 --chunk_amount 2: seed + 1, offset 3
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")


def reference(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "reference" / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", REFERENCES)
def test_records_equal_rulers_own_script(tokenizer, name):
    dataset, length, pre, seed = REFERENCES[name]
    expected = reference(name)
    got = generate_qa(dataset, tokenizer, length, len(expected), seed, source=str(FIXTURES), pre_samples=pre)
    assert got == expected  # every field, in RULER's order of keys too
    assert [list(r) for r in got] == [list(r) for r in expected]


def hub_rows(dataset: str) -> list[dict]:
    """The fixture as the hub stores it (rajpurkar/squad_v2, hotpotqa/hotpot_qa distractor: one row a question)."""
    data = json.loads((FIXTURES / f"{dataset}.json").read_text())
    if dataset == "hotpotqa":
        return [{"id": d["_id"], "question": d["question"], "answer": d["answer"], "type": d["type"], "level": d["level"],
                 "supporting_facts": {"title": [t for t, _ in d["supporting_facts"]],
                                      "sent_id": [i for _, i in d["supporting_facts"]]},
                 "context": {"title": [t for t, _ in d["context"]], "sentences": [s for _, s in d["context"]]}}
                for d in data]
    return [{"id": q["id"], "title": a["title"], "context": p["context"], "question": q["question"],
             "answers": {"text": [x["text"] for x in q["answers"]], "answer_start": [x["answer_start"] for x in q["answers"]]}}
            for a in data["data"] for p in a["paragraphs"] for q in p["qas"]]


@pytest.mark.parametrize("name", ["qa_1_1024", "qa_2_2048"])
def test_hub_rows_give_the_same_records(tokenizer, monkeypatch, name):
    import datasets

    dataset, length, _, _ = REFERENCES[name]
    asked = []

    def load_dataset(repo, config=None, split=None):
        asked.append((repo, config, split))
        return hub_rows(dataset)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert generate_qa(dataset, tokenizer, length, 3, 42) == reference(name)
    assert asked == [{"squad": ("rajpurkar/squad_v2", None, "validation"),
                      "hotpotqa": ("hotpotqa/hotpot_qa", "distractor", "validation")}[dataset]]


def one_line_error(call, *match: str) -> str:
    with pytest.raises(KVBenchError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    for m in match:
        assert m in message, message
    return message


def test_offline_and_not_cached_names_the_fetch(tokenizer, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'rajpurkar/squad_v2' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    one_line_error(lambda: generate_qa("squad", tokenizer, 1024, 3), "rajpurkar/squad_v2", "not in the hub cache",
                   "python scripts/prepare_ruler_qa.py --out data/ruler", "task.qa_dir=data/ruler")
    one_line_error(lambda: load_kvpress("simonjegou/ruler", 4096), "simonjegou/ruler", "not in the hub cache",
                   "datasets.load_dataset('simonjegou/ruler', data_dir='4096', split='test')")


def test_missing_and_malformed_files_name_file_row_and_fix(tokenizer, tmp_path):
    one_line_error(lambda: generate_qa("squad", tokenizer, 1024, 3, source=str(tmp_path)), "squad.json not found",
                   "prepare_ruler_qa.py")
    squad = json.loads((FIXTURES / "squad.json").read_text())
    del squad["data"][1]["paragraphs"][5]["qas"][1]["is_impossible"]
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    one_line_error(lambda: generate_qa("squad", tokenizer, 1024, 3, source=str(tmp_path)),
                   str(tmp_path / "squad.json"), "data[1].paragraphs[5].qas[1]", "not SQuAD v2's JSON format",
                   "dev-v2.0.json", "prepare_ruler_qa.py")
    hotpot = json.loads((FIXTURES / "hotpotqa.json").read_text())
    hotpot[2]["context"][4] = {"title": "Leek", "sentences": ["Leek is a town."]}  # the hub's shape, not the file's
    (tmp_path / "hotpotqa.json").write_text(json.dumps(hotpot))
    one_line_error(lambda: generate_qa("hotpotqa", tokenizer, 1024, 3, source=str(tmp_path)), "row 2",
                   "HotpotQA's distractor JSON format", "hotpot_dev_distractor_v1.json")
    (tmp_path / "hotpotqa.json").write_text("[{")
    one_line_error(lambda: generate_qa("hotpotqa", tokenizer, 1024, 3, source=str(tmp_path)), "not JSON")
    one_line_error(lambda: generate_qa("squad", tokenizer, 1024, 20, source=str(FIXTURES)), "fewer than the 20")


def test_lengths_rulers_script_never_finishes_are_one_error(tokenizer):
    # RULER retries for ever: at 10 documents a squad prompt is 799 tokens > 500 whatever it draws; at 930 tokens
    # hotpotqa's second sample steps from 11 documents to 1, fewer than its question's 10 (verified: qa.py hangs)
    one_line_error(lambda: generate_qa("squad", tokenizer, 500, 3, source=str(FIXTURES)), "799 tokens > 500",
                   "raise task.context_tokens")
    one_line_error(lambda: generate_qa("hotpotqa", tokenizer, 930, 5, source=str(FIXTURES)),
                   "cannot hold a sample's own documents", "raise task.context_tokens")


def test_kvpress_set_loads_as_kvpress_made_it(tmp_path):
    """kvpress/1024.parquet: kvpress's create_huggingface_dataset.py run on RULER's qa references (README)."""
    rows = load_kvpress(str(FIXTURES / "kvpress"), 1024)
    assert rows == load_kvpress(str(FIXTURES / "kvpress" / "1024.parquet"), 1024)
    assert [r["id"] for r in rows] == [f"{t}-{k}" for t in ("qa_1", "niah_single_1", "qa_2") for k in range(3)]
    for task in ("qa_1", "qa_2"):
        for row, ruler in zip([r for r in rows if r["task"] == task], reference(f"{task}_1024")):
            assert row["context"] + row["question"] + row["answer_prefix"] == ruler["input"] + ruler["answer_prefix"]
            assert row["question"].startswith("Answer the question based on the given documents.")
            assert row["question"].endswith("? ") and row["answer_prefix"] == "Answer:"
            assert row["outputs"] == ruler["outputs"] and row["max_new_tokens"] == 32
    assert {r["max_new_tokens"] for r in rows if r["task"] == "niah_single_1"} == {128}
    frame = pd.read_parquet(FIXTURES / "kvpress" / "1024.parquet")
    frame.to_json(tmp_path / "1024.jsonl", orient="records", lines=True)
    assert load_kvpress(str(tmp_path / "1024.jsonl"), 1024) == rows


def test_kvpress_bad_rows_are_one_line(tmp_path):
    frame = pd.read_parquet(FIXTURES / "kvpress" / "1024.parquet")
    frame.drop(columns=["answer_prefix"]).to_parquet(tmp_path / "a.parquet")
    one_line_error(lambda: load_kvpress(str(tmp_path / "a.parquet"), 1024), "a.parquet: row 0 has no answer_prefix")
    frame.loc[4, "max_new_tokens"] = -1
    frame.to_parquet(tmp_path / "b.parquet")
    one_line_error(lambda: load_kvpress(str(tmp_path / "b.parquet"), 1024), "b.parquet: row 4 is malformed",
                   "fetch the set again")
    one_line_error(lambda: load_kvpress(str(tmp_path), 8192), "8192.parquet not found",
                   "data_dir='8192', split='test').to_parquet(")


LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_kvbench_text_is_kvpress_prompt():
    """kvpress's pipeline.preprocess, with a chat template: the template around context + a separator, split at
    it; the question, the template's end and the answer prefix after it. kvbench's chat text (input = context +
    question, answer prefix after the wrapping) is the same string."""
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")
    tokenizer.chat_template = LLAMA3_TEMPLATE
    row = load_kvpress(str(FIXTURES / "kvpress"), 1024)[0]
    separator = "#" * (len(row["context"]) + 10)
    templated = tokenizer.apply_chat_template([{"role": "user", "content": row["context"] + separator}],
                                              add_generation_prompt=True, tokenize=False)
    context, suffix = templated.split(separator)
    kvpress = context + row["question"] + suffix + row["answer_prefix"]
    kvbench = wrap_chat(row["context"] + row["question"], "tokenizer", tokenizer) + row["answer_prefix"]
    # the template trims the message: the question's trailing space (kvpress keeps it) is gone in kvbench's
    assert kvbench == kvpress.replace(row["question"] + suffix, row["question"].rstrip() + suffix)
