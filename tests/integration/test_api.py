"""The Python API (`kvbench.evaluate`) and `kvbench list`."""

import json

import pytest

import kvbench
from kvbench.cli import listing, main
from kvbench.errors import KVBenchError
from kvbench.resources import ASSETS_DIR

SMALL = {"task.num_samples": 2, "task.context_tokens": 300}


def test_evaluate_by_config_names_returns_scores_and_records():
    result = kvbench.evaluate(model="tiny", method="streamingllm", budget=32, task="passkey", **SMALL)
    assert result.path is None  # no results= : nothing left on disk
    assert result.scores["method"] == "streamingllm" and result.scores["budget"] == "tokens32"
    assert result.scores["n"] == 2 and len(result.records) == 2 and "prediction" in result.records[0]
    assert len(result.scores["run_id"]) == 8


def test_evaluate_a_loaded_model_writes_the_same_run_folder_and_reads_it_back(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(ASSETS_DIR / "tiny-llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    first = kvbench.evaluate(model=model, tokenizer=tokenizer, method="h2o", budget=0.5, results=tmp_path,
                             task__num_samples=2, task__context_tokens=300)
    assert first.path.parts[-4] == "tiny-llama"  # runs/<model>/<task>/<method>/<budget>-<run id>
    assert first.path.name.startswith("ratio0.5-")
    on_disk = json.loads((first.path / "scores.json").read_text())
    assert on_disk["scores"] == first.scores["scores"]
    again = kvbench.evaluate(model=model, tokenizer=tokenizer, method="h2o", budget=0.5, results=tmp_path,
                             task__num_samples=2, task__context_tokens=300)  # finished: read back, not rerun
    assert again.path == first.path and again.records == first.records


def test_evaluate_any_model_folder_or_hub_id_by_path(tmp_path):
    result = kvbench.evaluate(model=str(ASSETS_DIR / "tiny-llama"), method="full", results=tmp_path, **SMALL)
    assert result.scores["model"] == "tiny-llama"


def test_evaluate_bad_input_is_a_kvbench_error():
    with pytest.raises(KVBenchError, match="unknown method 'snapkvv'"):
        kvbench.evaluate(method="snapkvv")
    with pytest.raises(KVBenchError, match="task.nope is not a setting"):
        kvbench.evaluate(**{"task.nope": 1})
    with pytest.raises(KVBenchError, match="needs its tokenizer"):
        kvbench.evaluate(model=object())


def test_list_names_every_config_with_one_line(capsys):
    groups = listing()
    assert set(groups) == {"methods", "tasks", "models", "experiments"}
    assert "snapkv" in groups["methods"] and "demo" in groups["experiments"] and "tiny" in groups["models"]
    assert all(text and "\n" not in text for entries in groups.values() for text in entries.values())
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("methods (method=NAME):") and "StreamingLLM" in out
    assert main(["list", "nothing"]) == 2
