"""RULER (issue 24): kvbench's generation gives the samples NVIDIA/RULER's own scripts wrote (fixtures), at the
target length, deterministically, for two tokenizers; the metrics equal evaluate.py's; QA data and kvpress's set
load, and bad data is one line; the task runs end to end and marks its question."""

import json
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from kvbench.engine import Budget, install
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.models.families import tiny_model
from kvbench.models.generator import Generator
from kvbench.resources import ASSETS_DIR
from kvbench.tasks.ruler import (
    Ruler,
    postprocess,
    question_of,
    string_match_all,
    string_match_part,
    task_score,
)
from kvbench.tasks.ruler_data import TASKS, generate
from kvbench.tasks.ruler_qa import load_kvpress, load_qa

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ruler"
TOKENIZERS = {"bpe": FIXTURES / "bpe_tokenizer", "byte": ASSETS_DIR / "byte_tokenizer"}


@pytest.fixture(scope="module")
def tokenizers():
    return {name: AutoTokenizer.from_pretrained(path) for name, path in TOKENIZERS.items()}


def references() -> list[tuple]:
    """(tokenizer, task, length, file) of every reference file (`<task>.jsonl` at 1024 tokens, `<task>_2048.jsonl`)."""
    out = []
    for path in sorted((FIXTURES / "reference").glob("*/*.jsonl")):
        length = 2048 if path.stem.endswith("_2048") else 1024
        out.append((path.parent.name, path.stem.removesuffix("_2048"), length, path))
    return out


REFERENCES = references()


@pytest.mark.parametrize("tokenizer,task,length,path", REFERENCES, ids=[f"{t}-{k}-{n}" for t, k, n, _ in REFERENCES])
def test_samples_equal_rulers_own_scripts(tokenizers, tokenizer, task, length, path):
    expected = [json.loads(line) for line in path.read_text().splitlines()]
    extra = {"qa_data": load_qa(TASKS[task][1]["dataset"], str(FIXTURES))} if task.startswith("qa") else {}
    got = generate(task, tokenizers[tokenizer], length, len(expected), 42, **extra)
    for g, e in zip(got, expected):
        assert {k: g[k] for k in e} == e


LENGTH_CASES = [("bpe", 2048, t) for t in ("niah_single_1", "niah_single_2", "niah_multikey_2", "niah_multivalue", "vt",
                                            "cwe", "fwe")] + [("byte", 1024, t) for t in ("niah_single_1", "niah_multikey_2", "fwe")]


@pytest.mark.parametrize("tokenizer,length,task", LENGTH_CASES)  # byte-level: RULER's essay step (500 words) overshoots
def test_deterministic_and_at_the_target_length(tokenizers, tokenizer, length, task):
    tok = tokenizers[tokenizer]
    essay = (ASSETS_DIR / "haystack.txt").read_text() * 3
    first = generate(task, tok, length, 2, 7, essay=essay)
    assert first == generate(task, tok, length, 2, 7, essay=essay)
    assert first != generate(task, tok, length, 2, 8, essay=essay)
    tokens = {"cwe": 120, "fwe": 50, "vt": 30}.get(task, 128)
    for r in first:
        assert r["length"] == len(tok.tokenize(r["input"] + r["answer_prefix"])) + tokens
        # at most the target; RULER's search fills it to within its step (words, haystack lines, list entries)
        assert 0.5 * length < r["length"] <= length


def test_vt_that_cannot_fit_is_one_error(tokenizers):
    with pytest.raises(KVBenchError, match="raise task.context_tokens"):  # RULER's loop never ends here
        generate("vt", tokenizers["byte"], 1024, 1, 42)


def test_metrics_equal_rulers():
    fixture = json.loads((FIXTURES / "metrics.json").read_text())
    by_task = {}
    for case in fixture["cases"]:
        pred = postprocess(case["pred"])
        assert pred == case["postprocessed"]
        match = string_match_part if case["task"].startswith("qa") else string_match_all
        assert match(pred, case["outputs"]) * 100 == pytest.approx(case["sample_score"])
        by_task.setdefault(case["task"], []).append(match(pred, case["outputs"]))
    assert {t: task_score(s) for t, s in by_task.items()} == fixture["task_scores"]
    assert postprocess("a\x00b ", source="kvpress") == "ab"  # kvpress removes control characters


def test_qa_data_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(KVBenchError, match="prepare_ruler_qa.py"):
        load_qa("squad", str(tmp_path))
    (tmp_path / "squad.json").write_text('{"data": [{"title": "x", "paragraphs": [{"qas": []}]}]}')
    with pytest.raises(KVBenchError, match="not SQuAD v2's JSON format"):
        load_qa("squad", str(tmp_path))
    (tmp_path / "hotpotqa.json").write_text("[{")
    with pytest.raises(KVBenchError, match="not JSON"):
        load_qa("hotpotqa", str(tmp_path))
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(KVBenchError, match="not in the hub cache.*prepare_ruler_qa"):
        load_qa("hotpotqa")


def test_hub_rows_regroup_as_rulers_files():
    """The hub's SQuAD rows give what the JSON file gives (the fixture, flattened as the hub stores it)."""
    from kvbench.tasks.ruler_qa import hub_rows_as_json, read_squad

    data = json.loads((FIXTURES / "squad.json").read_text())
    rows = [{"title": a["title"], "context": p["context"], "question": q["question"],
             "answers": {"text": [x["text"] for x in q["answers"]]}}
            for a in data["data"] for p in a["paragraphs"] for q in p["qas"]]
    assert read_squad(hub_rows_as_json("squad", rows), "hub") == read_squad(data, "file")


def test_kvpress_set_loads_and_bad_rows_are_one_line(tmp_path):
    rows = pd.DataFrame([{"context": "Some special magic numbers ... \n", "question": "What are all the special magic "
                          "numbers for a-b mentioned in the provided text?", "answer_prefix": " The special magic numbers "
                          "for a-b mentioned in the provided text are", "answer": ["123"], "task": "niah_single_1",
                          "max_new_tokens": 128}] * 3)
    rows.to_parquet(tmp_path / "4096.parquet")
    task = Ruler(source="kvpress", kvpress_data=str(tmp_path), tasks=["niah_single_1"], num_samples=2)
    samples = task.samples(None)
    assert [s["id"] for s in samples] == ["niah_single_1-0", "niah_single_1-1"] and task.label == "ruler_4096_kvpress"
    assert samples[0]["input"].endswith(samples[0]["question"]) and samples[0]["outputs"] == ["123"]
    rows.drop(columns=["answer_prefix"]).to_parquet(tmp_path / "4096.parquet")
    with pytest.raises(KVBenchError, match="row 0 has no answer_prefix"):
        load_kvpress(str(tmp_path), 4096)
    with pytest.raises(KVBenchError, match="not found"):
        load_kvpress(str(tmp_path / "8192.parquet"), 8192)


def test_task_runs_end_to_end_and_marks_its_question(tokenizers):
    tok = tokenizers["bpe"]
    model = tiny_model("llama", vocab_size=len(tok))
    install(model)
    task = Ruler(tasks=["niah_single_1", "fwe"], context_tokens=600, num_samples=2, chat=False)
    samples = task.samples(tok)
    assert [s["id"] for s in samples] == ["niah_single_1-0", "niah_single_1-1", "fwe-0", "fwe-1"]
    assert task.limit_samples(samples, 1) == [samples[0], samples[2]]
    generator = Generator(model, tok, build({"name": "snapkv", "window": 8, "query": "agnostic"}), Budget(tokens=64))
    records = []
    for sample in samples:
        prompt = task.prepare(sample, generator)
        asked = tok.decode(prompt.input_ids[0, prompt.question_start:].tolist())
        assert asked.startswith(sample["question"][:20]) and asked.endswith(sample["answer_prefix"])
        records.append(task.record(sample, prompt, generator.run(prompt), generator))
    assert all(0 <= r["score"] <= 1 and r["n_new"] <= {"niah_single_1": 128, "fwe": 50}[r["task"]] for r in records)
    assert set(task.score(records)) == {"niah_single_1", "fwe"}
    assert question_of("niah_single_1", samples[0]["input"]).startswith("What is the special magic number")
    with pytest.raises(KVBenchError, match="RULER's tasks are"):
        Ruler(tasks=["niah_single_9"])
