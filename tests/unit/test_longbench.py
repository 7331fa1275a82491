"""LongBench: official metric semantics (hand-checked values), prompt construction, data loading, end to end."""

import json
import zipfile
from pathlib import Path

import pytest

from kvbench.errors import KVBenchError
from kvbench.tasks import build
from kvbench.tasks.longbench import SPEC, TASKS, build_prompt, data_files, extract_data_zip, newline_token_id
from kvbench.tasks.metrics import (
    best_over_answers,
    classification,
    code_sim,
    count,
    first_code_line,
    first_line,
    length_bucket,
    qa_f1,
    retrieval,
    rouge_l,
    task_score,
)
from tests.helpers import LONGBENCH_FIXTURES as FIXTURES  # noqa: E402

# ----------------------------------------------------------------------------- metrics


def test_qa_f1():
    # normalised: "cat sat" vs "cat sat on mat" -> overlap 2, P = 1, R = 1/2, F1 = 2/3
    assert qa_f1("The Cat sat.", "a cat sat on the mat") == pytest.approx(2 / 3)
    assert qa_f1("", "a cat") == 0.0
    assert qa_f1("dog", "cat") == 0.0
    # multiset overlap: "the the" is dropped entirely (articles), "cat cat" vs "cat" overlaps once
    assert qa_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_rouge_l_semantics_of_the_rouge_package():
    # summary-level union LCS on word sets: {the, cat, on, mat} = 4 of 5 distinct words each side -> F = 0.8
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    assert rouge_l("", "the cat") == 0.0  # the package raises on an empty hypothesis -> 0
    no_period = " ".join(f"word{i % 50}" for i in range(1200))
    assert rouge_l(no_period, no_period) == 0.0  # the package's recursion error -> 0, as in the official numbers


def test_classification_with_overlapping_names():
    classes = ["City", "Other location", "location", "State"]
    # "location" is in the answer but is not the answer -> removed; 1/1
    assert classification("Other location", "Other location", all_classes=classes) == 1.0
    # the official loop removes while iterating: after "Dat" is removed, "Da" is never checked -> 1/2
    assert classification("Date", "Date", all_classes=["Date", "Dat", "Da", "Other"]) == 0.5
    assert classification("It is a City or a State", "State", all_classes=classes) == 0.5
    assert classification("City", "State", all_classes=classes) == 0.0
    assert classification("", "State", all_classes=classes) == 0.0


def test_count_and_retrieval_with_several_numbers():
    assert count("There are 3 unique paragraphs out of 5, so 3", "3") == pytest.approx(2 / 3)
    assert count("no numbers", "3") == 0.0
    assert count("", 3) == 0.0
    assert retrieval("Paragraph 12, or maybe paragraph 3", "Paragraph 12") == 0.5
    assert retrieval("The answer is 12", "Paragraph 12") == 1.0
    assert retrieval("", "Paragraph 12") == 0.0


def test_code_sim_first_line_rules():
    prediction = "\n\n```python\n# the next line\n// not python\n    total_5 = compute('x', 5)\nmore"
    assert first_code_line(prediction) == "    total_5 = compute('x', 5)"
    assert code_sim(prediction, "    total_5 = compute('x', 5)") == 1.0
    assert first_code_line("```\n\nx = 1") == ""  # a blank line qualifies
    assert code_sim("```\n\nx = 1", "x = 1") == 0.0  # and an empty string scores 0 (fuzzywuzzy)
    assert code_sim("`only` # lines", "x") == 0.0
    # Levenshtein ratio as an integer percent: abcd/abce -> (8 - 2) / 8 = 75; abc/abd -> 66.7 -> 67
    assert code_sim("abcd", "abce") == 0.75
    assert code_sim("abc", "abd") == 0.67


def test_scorer_rules():
    assert best_over_answers("qa_f1", "keeper", ["the keeper of the river", "keeper"]) == 1.0
    assert best_over_answers("qa_f1", "keeper of the river", ["keeper", "the keeper of the river"]) == 1.0
    assert best_over_answers("qa_f1", "x", []) == 0.0
    assert task_score([1.0, 0.5, 0.0]) == 50.0
    assert task_score([1 / 3] * 3) == 33.33
    assert first_line("\n\nAnswer here\nmore") == "Answer here"
    assert [length_bucket(n) for n in (0, 3999, 4000, 7999, 8000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+"]


# ----------------------------------------------------------------------------- spec and prompts


def test_spec_is_the_official_english_table():
    assert TASKS == [
        "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
        "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
    ]
    lengths = {t: SPEC["tasks"][t]["max_new_tokens"] for t in TASKS}
    assert lengths["gov_report"] == 512 and lengths["samsum"] == 128 and lengths["hotpotqa"] == 32
    assert SPEC["tasks"]["lcc"]["prompt"] == "Please complete the code given below. \n{context}Next line of code:\n"
    assert len(data_files("e")) == 13
    vatp = dict(data_files("vatp"))
    assert vatp["narrativeqa"] == "narrativeqa" and vatp["qasper"] == "qasper_e" and len(vatp) == 16


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A real BPE tokenizer with merges and a BOS, trained offline on the fixtures."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [json.loads(line)["context"] for p in FIXTURES.glob("*.jsonl") for line in p.read_text().splitlines()]
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def sample_of(task, index=1):
    row = [json.loads(x) for x in (FIXTURES / f"{task}.jsonl").read_text().splitlines()][index]
    return {**row, "answers": row["answers"], "all_classes": row["all_classes"] or []}


@pytest.mark.parametrize("task,chat", [("hotpotqa", True), ("trec", False), ("lcc", False)])
def test_truncated_chat_prompt_ids_match_the_official_rules(bpe_tokenizer, task, chat):
    tok = bpe_tokenizer
    row = sample_of(task)
    max_tokens = 101
    # by hand, in pred.py's order: fill, tokenize with BOS, keep int(M/2) tokens each side, decode each
    # half without special tokens, join, wrap in [INST]...[/INST] unless the task skips it, encode again
    filled = SPEC["tasks"][task]["prompt"].format(**row)
    ids = tok(filled).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) > max_tokens
    joined = tok.decode(ids[:50], skip_special_tokens=True) + tok.decode(ids[-50:], skip_special_tokens=True)
    wrapped = f"[INST]{joined}[/INST]" if chat else joined
    expected = tok(wrapped).input_ids

    prompt, truncated = build_prompt(row, task, tok, max_tokens, "llama2")
    assert truncated
    assert tok(prompt).input_ids == expected
    assert prompt.startswith("[INST]") == chat


def test_short_prompt_is_not_truncated_and_vicuna_wrap(bpe_tokenizer):
    row = sample_of("hotpotqa", 0)
    prompt, truncated = build_prompt(row, "hotpotqa", bpe_tokenizer, 10_000, "vicuna")
    assert not truncated
    assert prompt.endswith(" ASSISTANT:") and SPEC["tasks"]["hotpotqa"]["prompt"].format(**row) in prompt


def test_samsum_newline_stop(bpe_tokenizer, tiny_gqa):
    for tok in (bpe_tokenizer, tiny_gqa[1]):
        assert tok.decode([newline_token_id(tok)]) == "\n"


# ----------------------------------------------------------------------------- data


def test_missing_data_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = build({"name": "longbench", "data_dir": str(tmp_path / "nothing")})
    with pytest.raises(KVBenchError, match=r"scripts/prepare_longbench.py --out .*nothing"):
        task.samples()


def test_local_parquet_and_subsets(tmp_path):
    import pandas as pd

    rows = [json.loads(x) for x in (FIXTURES / "trec.jsonl").read_text().splitlines()]
    pd.DataFrame(rows).to_parquet(tmp_path / "trec.parquet")
    task = build({"name": "longbench", "data_dir": str(tmp_path), "subsets": ["trec"]})
    samples = task.samples()
    assert [s["id"] for s in samples] == [f"trec/{r['_id']}" for r in rows]
    assert samples[0]["all_classes"] == rows[0]["all_classes"]
    with pytest.raises(KVBenchError, match="not a task of LongBench variant 'e'"):
        build({"name": "longbench", "variant": "e", "subsets": ["narrativeqa"]})


def test_data_zip_is_unzipped(tmp_path, monkeypatch):
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(FIXTURES / "trec.jsonl", "data/trec.jsonl")
        zf.writestr("data/README.txt", "x")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: str(archive))
    out = extract_data_zip("THUDM/LongBench", tmp_path / "lb")
    assert sorted(p.name for p in out.iterdir()) == ["trec.jsonl"]


# ----------------------------------------------------------------------------- end to end


def run_longbench(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from kvbench.resources import CONFIG_DIR
    from kvbench.runner.run import execute

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "logger=none", f"paths.results={tmp_path}", "task=longbench", f"task.data_dir={FIXTURES}",
            "model.max_prompt_tokens=1024", *overrides,
        ])
    return execute(cfg)


@pytest.mark.slow
def test_all_16_tasks_run_and_tabulate(tmp_path):
    from kvbench.report.tables import build_tables

    folder = run_longbench(tmp_path, "method=full")
    scores = json.loads((folder / "scores.json").read_text())
    assert list(scores["scores"]) == TASKS and scores["n"] == 32
    assert scores["average"] == round(sum(scores["scores"].values()) / 16, 2)
    records = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
    assert any(r["truncated"] for r in records) and not all(r["truncated"] for r in records)
    assert all(0.0 <= r["score"] <= 1.0 for r in records)
    # any engine method runs the same way
    run_longbench(tmp_path, "method=snapkv", "budget.tokens=64")
    table, paths = build_tables(tmp_path, "longbench")["longbench"]
    assert list(table.columns) == TASKS + ["Avg", "n"] and list(table["n"]) == [32, 32]
    assert [r[1] for r in table.index] == ["full", "snapkv"]
    assert paths["md"].read_text().count("\n") == 4


@pytest.mark.slow
def test_longbench_e_buckets(tmp_path):
    folder = run_longbench(tmp_path, "task=longbench_e", "task.subsets=[trec,hotpotqa]", "method=h2o", "budget.tokens=48")
    assert folder.parts[-3] == "longbench_e"  # variants do not share a run folder
    scores = json.loads((folder / "scores.json").read_text())
    assert list(scores["scores"]) == ["hotpotqa", "trec"]  # the papers' order, not the config's
    buckets = scores["length_buckets"]
    assert set(buckets) == {"hotpotqa", "trec"}
    assert set(buckets["trec"]) == {"0-4k", "4-8k", "8k+"}
    assert all(v is not None for v in buckets["trec"].values())


def test_missing_file_is_fetched_from_the_data_zip_when_online(tmp_path, monkeypatch):
    import shutil

    import kvbench.tasks.longbench as longbench

    def fake_extract(repo, out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / "trec.jsonl", Path(out_dir) / "trec.jsonl")
        return Path(out_dir)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(longbench, "extract_data_zip", fake_extract)
    task = build({"name": "longbench", "data_dir": str(tmp_path / "lb"), "subsets": ["trec"]})
    assert len(task.samples()) == 2
    with pytest.raises(KVBenchError, match="prepare_longbench"):  # downloads disabled: the clear error
        build({"name": "longbench", "data_dir": str(tmp_path / "x"), "subsets": ["trec"], "download": False}).samples()


def test_limit_is_per_subset_as_in_lm_eval_harness():
    from kvbench.tasks import limit_samples

    task = build({"name": "longbench", "data_dir": str(FIXTURES), "subsets": ["hotpotqa", "trec"], "limit": 1})
    samples = limit_samples(task, task.samples(), 1)
    assert [s["task"] for s in samples] == ["hotpotqa", "trec"]  # one of each, trec is not dropped
    assert len(limit_samples(task, task.samples(), 2)) == 4
    assert limit_samples(task, task.samples(), None) == task.samples()
    with pytest.raises(KVBenchError, match="task.limit=0"):
        limit_samples(task, task.samples(), 0)


def test_a_subset_without_samples_is_one_error(tmp_path):
    (tmp_path / "trec.jsonl").write_text("")
    (tmp_path / "hotpotqa.jsonl").write_text((FIXTURES / "hotpotqa.jsonl").read_text())
    task = build({"name": "longbench", "data_dir": str(tmp_path), "subsets": ["hotpotqa", "trec"], "download": False})
    with pytest.raises(KVBenchError, match="trec.jsonl: no samples"):
        task.samples()
