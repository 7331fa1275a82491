"""Every bad input of issue 16 stops before any work with one line naming the fix, and leaves nothing behind."""

import json
import os

import pytest
from hydra import compose, initialize_config_dir

from kvbench.errors import KVBenchError
from kvbench.models.loading import BYTE_TOKENIZER_DIR
from kvbench.resources import CONFIG_DIR
from kvbench.runner.run import execute
from kvbench.tasks import build


def config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=["logger=none", f"paths.results={tmp_path}", "task.num_samples=1",
                                             *overrides])


PASSKEY = "task.context_tokens=300"


def no_model(monkeypatch):
    def refuse(cfg):
        raise AssertionError("the model must not load for a bad input")

    monkeypatch.setattr("kvbench.models.load", refuse)


def test_model_path_on_the_tiny_config_is_honoured(tmp_path):
    with pytest.raises(KVBenchError, match="model.path=/no/such/model is not a model folder"):
        execute(config(tmp_path, PASSKEY, "model.path=/no/such/model"))
    assert not (tmp_path / "runs").exists()
    from kvbench.resources import ASSETS_DIR

    folder = execute(config(tmp_path, PASSKEY, f"model.path={ASSETS_DIR / 'tiny-llama'}"))  # any HF folder or hub id
    assert folder.parts[-4] == "tiny-llama"  # named after the path, not filed as `tiny`


def test_context_beyond_the_models_positions(tmp_path):
    with pytest.raises(KVBenchError, match="beyond the model's 2048 positions"):
        execute(config(tmp_path, "task.context_tokens=4096"))
    assert not (tmp_path / "runs").exists()


def test_results_folder_that_cannot_be_written_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    no_model(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(KVBenchError, match="not a writable folder; set paths.results"):
        execute(config(tmp_path / "a-file" / "results"))
    if os.geteuid() != 0:  # root writes into read-only folders
        readonly = tmp_path / "ro"
        readonly.mkdir(mode=0o555)
        with pytest.raises(KVBenchError, match="not a writable folder"):
            execute(config(readonly))
        assert list(readonly.iterdir()) == []


def test_prompt_only_method_on_perplexity_leaves_no_folder(tmp_path, monkeypatch):
    no_model(monkeypatch)
    with pytest.raises(KVBenchError, match="perplexity compresses after every token, which snapkv cannot"):
        execute(config(tmp_path, "task=ppl_synthetic", "method=snapkv", "budget.tokens=32"))
    assert not (tmp_path / "runs").exists()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BYTE_TOKENIZER_DIR))


def ppl_task(source, **extra):
    return build({"name": "perplexity", "dataset": "pg19", "source": str(source), "num_tokens": 16, **extra})


def test_text_sources_json_array_and_missing_field(tmp_path):
    array = tmp_path / "books.json"
    array.write_text(json.dumps([{"text": "one book " * 5}, {"text": "another " * 5}]))
    assert len(ppl_task(array).samples(tokenizer())) == 2
    strings = tmp_path / "plain.json"
    strings.write_text(json.dumps(["a text " * 5]))
    assert len(ppl_task(strings).samples(tokenizer())) == 1
    lines = tmp_path / "books.jsonl"
    lines.write_text(json.dumps({"text": "fine " * 5}) + "\n" + json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(KVBenchError, match=r"line 2 has no text field 'text' \(its keys: body\); set task.text_field"):
        ppl_task(lines).samples(tokenizer())
    with pytest.raises(KVBenchError, match="line 1 has no text field 'body'"):
        ppl_task(lines, text_field="body").samples(tokenizer())
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(KVBenchError, match="is not valid JSON"):
        ppl_task(broken).samples(tokenizer())


def test_a_users_text_is_filed_under_its_own_name(tmp_path):
    assert ppl_task(tmp_path / "books.jsonl").label == "ppl_books"
    assert ppl_task(tmp_path / "books.jsonl", dataset="mybooks").label == "ppl_mybooks"
    assert build({"name": "perplexity", "dataset": "pg19"}).label == "ppl_pg19"
    assert build({"name": "perplexity", "dataset": "pg19", "source": "emozilla/pg19-test"}).label == "ppl_pg19"
