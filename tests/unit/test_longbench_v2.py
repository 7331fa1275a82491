"""LongBench v2 (kvbench/tasks/longbench_v2.py) against THUDM/LongBench's pred.py / result.py: the prompt files
byte for byte, extract_answer (the reference function itself, from a fixture copy), result.py's numbers (stored
from running it on a fixture), the truncation rule, the two chain-of-thought passes, the error lines, and runs
through the tiny model."""

import hashlib
import json
from pathlib import Path

import pytest

from kvbench.errors import KVBenchError
from kvbench.models.generator import Generation
from kvbench.tasks import build, limit_samples
from kvbench.tasks.longbench_v2 import TEMPLATES, extract_answer, fetch_command, fill, truncate_middle

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "longbench_v2"
DATA = FIXTURES / "data.jsonl"
ROWS = [json.loads(line) for line in DATA.read_text().splitlines()]


def task(**settings):
    return build({"name": "longbench_v2", "data_path": str(DATA), **settings})


def generator(tiny_gqa, method=None, budget=None, **kwargs):
    from kvbench.methods import build as build_method
    from kvbench.models.generator import Generator

    model, tok = tiny_gqa
    return Generator(model, tok, build_method(method or {"name": "full"}), budget, **kwargs)


def reference_extract_answer():
    scope: dict = {}
    exec((FIXTURES / "pred_extract_answer.py.txt").read_text(), scope)  # pred.py's own function
    return scope["extract_answer"]


# ----------------------------------------------------------------------------- prompts, extraction, scoring


def test_prompt_files_are_the_reference_blobs():
    """The git blob ids of prompts/*.txt at THUDM/LongBench 2e00731 (`git ls-tree HEAD prompts/`)."""
    blobs = {"0shot": "81ad9bc1e85ad7ba5b4780fe0fa87745f4bfd964", "0shot_cot": "372d217b0d77778428092b01e93ad9a8274c366c",
             "0shot_cot_ans": "06318c5f9c3d4426122ab226b345aa8ce0fad471",
             "0shot_no_context": "c891fbb9910e63ecf9aee270a002b0c389fe4801"}
    for name, blob in blobs.items():
        data = TEMPLATES[name].encode()
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, name


def test_fill_is_pred_py_replace_chain():
    row = ROWS[1]
    by_hand = (TEMPLATES["0shot_cot_ans"].replace("$DOC$", row["context"].strip()).replace("$Q$", row["question"].strip())
               .replace("$C_A$", row["choice_A"].strip()).replace("$C_B$", row["choice_B"].strip())
               .replace("$C_C$", row["choice_C"].strip()).replace("$C_D$", row["choice_D"].strip())
               .replace("$COT$", "step $Q$"))
    assert fill(TEMPLATES["0shot_cot_ans"], row, "step $Q$") == by_hand  # $COT$ last: its text is not refilled
    assert "When did the committee meet?\nChoices:\n(A) Monday" in fill(TEMPLATES["0shot"], row)


TRICKY = [
    "The correct answer is (B)", "The correct answer is C", "the correct answer is (b)", "the correct answer is B",
    "I cannot tell.", "", "**The correct answer is (A)**", "The correct answer is **D**",
    "The correct answer is C. No wait: The correct answer is (B)", "The correct answer is (E) or The correct answer is A",
    "The correct answer is (a)", "The correct answer is Both", "The correct answer is (D).", "The correct answer is: (C)",
    "The correct answer is ( B )", "Thecorrect answer is (B)", "The correct  answer is (B)", "The correct answer is(A)",
    "The correct answer is (A) and The correct answer is (C)", "The correct answer is \n(B)",
]


@pytest.mark.parametrize("response", TRICKY)
def test_extraction_equals_pred_py(response):
    assert extract_answer(response) == reference_extract_answer()(response)


def test_extraction_by_hand():
    assert [extract_answer(r) for r in TRICKY[:10]] == ["B", "C", None, None, None, None, "A", "D", "B", "A"]


def records_of_predictions(compensated: bool) -> list[dict]:
    """pred.py's output rows as kvbench records."""
    rows = [json.loads(line) for line in (FIXTURES / "predictions.jsonl").read_text().splitlines()]
    return [{"id": r["_id"], "difficulty": r["difficulty"], "length": r["length"], "domain": r["domain"], "pred": r["pred"],
             "score": 0.25 if compensated and r["pred"] is None else float(r["judge"])} for r in rows]


@pytest.mark.parametrize("compensated", [False, True])
def test_scores_equal_result_py(compensated):
    """result.py's row (run on the fixture; expected_result.json) in its columns' order, 1 decimal."""
    expected = json.loads((FIXTURES / "expected_result.json").read_text())
    line = expected["result.py compensated" if compensated else "result.py"].split("\t")[1:]
    records = records_of_predictions(compensated)
    scores = task(compensated=compensated).score(records)
    assert list(scores) == ["overall", "easy", "hard", "short", "medium", "long"]
    assert [str(v) for v in scores.values()] == line
    units = task().units(records)
    assert list(units) == list(scores) and len(units["overall"].keys) == len(records)
    for column, u in units.items():
        assert round(float(u.score(u.sums, u.counts)), 1) == scores[column]
    details = task().score_details(records)
    assert details["no_answer"] == round(100 * 5 / 14, 1) and set(details["by_domain"]) == {r["domain"] for r in ROWS}


def test_empty_column_is_left_out():
    records = [{"id": "a", "difficulty": "hard", "length": "long", "score": 1.0, "pred": "A", "domain": "x"}]
    assert task().score(records) == {"overall": 100.0, "hard": 100.0, "long": 100.0}


# ----------------------------------------------------------------------------- truncation


def test_truncation_is_pred_py_rule(tiny_gqa):
    tok = tiny_gqa[1]  # bytes: one character per token after the BOS
    text = "".join(chr(ord("a") + i % 26) for i in range(300))
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and len(ids) == 301
    for m in (51, 50):
        cut, truncated = truncate_middle(text, tok, m)
        assert truncated and cut == tok.decode(ids[: m // 2] + ids[-m // 2 :], skip_special_tokens=True)
        assert cut == text[: m // 2 - 1] + text[-(m - m // 2):]  # odd M: one more token from the end
    assert truncate_middle(text, tok, 301) == (text, False) and truncate_middle(text, tok, None) == (text, False)
    # the two halves are decoded together: a character cut in two by the ends can join again
    wide = "é" * 100
    ids = tok.encode(wide)
    cut, _ = truncate_middle(wide, tok, 41)  # BOS + 19 bytes (ends inside an é) and the last 21 (starts inside one)
    apart = tok.decode(ids[:20], skip_special_tokens=True) + tok.decode(ids[-21:], skip_special_tokens=True)
    assert cut == "é" * 20 != apart


def test_prompt_is_truncated_chatted_and_marks_the_question(tiny_gqa):
    gen = generator(tiny_gqa, chat_format="llama2", max_prompt_tokens=4096)
    sample = task().samples()[2]
    seen = []
    encode = gen.encode
    gen.encode = lambda text: seen.append(text) or encode(text)
    prompt = task(max_prompt_tokens=601).prepare(sample, gen)
    full = fill(TEMPLATES["0shot"], sample)
    ids = tiny_gqa[1].encode(full)
    assert len(ids) > 601 and prompt.info["truncated"] and prompt.max_new_tokens == 128
    assert seen[0] == "[INST]" + tiny_gqa[1].decode(ids[:300] + ids[-301:], skip_special_tokens=True) + "[/INST]"
    question = tiny_gqa[1].decode(prompt.input_ids[0, prompt.question_start:])
    assert question == full[full.index("What is the correct answer"):] + "[/INST]"
    untouched = task().prepare(sample, gen)  # null: the model's max_prompt_tokens (4096)
    assert not untouched.info["truncated"] and untouched.input_ids.shape[1] == len(ids) + len("[INST][/INST]")
    seen.clear()
    alone = task(no_context=True, chat=False).prepare(sample, gen)
    assert seen[0] == fill(TEMPLATES["0shot_no_context"], sample) and alone.question_start == 1
    cut = task(max_prompt_tokens=40).prepare(sample, gen)  # the question itself cut: no question to append
    assert cut.question_start is None


def test_chain_of_thought_two_passes(tiny_gqa):
    gen = generator(tiny_gqa)
    t = task(cot=True)
    sample = t.samples()[0]
    first = t.prepare(sample, gen)
    assert first.max_new_tokens == 1024 and "Let’s think step by step:" in gen.tokenizer.decode(first.input_ids[0])
    answers = []

    def run(prompt):
        answers.append(prompt)
        return Generation(tokens=[gen.tokenizer.encode("**The correct answer is (B)** ", add_special_tokens=False)],
                          prompt_tokens=prompt.input_ids.shape[1], seconds=0.5)

    gen.run = run
    thought = gen.tokenizer.encode("\n  The pier is east.  \n", add_special_tokens=False)
    record = t.record(sample, first, Generation(tokens=[thought], prompt_tokens=first.input_ids.shape[1], seconds=2.0), gen)
    (second,) = answers
    text = gen.tokenizer.decode(second.input_ids[0], skip_special_tokens=True)
    assert text == fill(TEMPLATES["0shot_cot_ans"], sample, "The pier is east.") and sample["context"].strip() not in text
    assert second.max_new_tokens == 128
    assert text[gen.tokenizer.decode(second.input_ids[0, :second.question_start], skip_special_tokens=True).__len__():] \
        .startswith("What is the correct answer to this question:")
    assert record["response_cot"] == "The pier is east." and record["prediction"] == "**The correct answer is (B)**"
    assert (record["pred"], record["judge"], record["score"]) == ("B", True, 1.0)
    assert record["seconds"] == 2.0 and record["answer_pass"]["seconds"] == 0.5 and record["task"] == "longbench_v2_cot"


def test_greedy_by_default_and_seeded_sampling(tiny_gqa):
    gen = generator(tiny_gqa)
    sample = task().samples()[0]
    assert task().prepare(sample, gen).sampling is None
    hot = task(temperature=0.1, seed=3).prepare(sample, gen).sampling
    assert hot.temperature == 0.1 and hot.seed == task(temperature=0.1, seed=3).prepare(sample, gen).sampling.seed


# ----------------------------------------------------------------------------- data and errors


def test_rows_load_from_json_jsonl_parquet_and_filter(tmp_path):
    import pandas as pd

    samples = task().samples()
    assert [s["id"] for s in samples] == [r["_id"] for r in ROWS]
    assert samples[1]["question"] == ROWS[1]["question"] and set(samples[0]) == {"id", *ROWS[0]} - {"_id"}
    (tmp_path / "data.json").write_text(json.dumps(ROWS))
    pd.DataFrame(ROWS).to_parquet(tmp_path / "data.parquet")
    for name in ("data.json", "data.parquet"):
        assert task(data_path=str(tmp_path / name)).samples() == samples
    hard_long = task(difficulty=["hard"], length=["long", "medium"]).samples()
    assert [s["id"] for s in hard_long] == [ROWS[1]["_id"], ROWS[2]["_id"]]
    assert [s["domain"] for s in task(domain="Multi-Document QA").samples()] == ["Multi-Document QA"]
    assert limit_samples(task(), samples, 2) == samples[:2]
    assert (task().label, task(no_context=True).label) == ("longbench_v2", "longbench_v2_no_context")


def write_rows(tmp_path, rows, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_error_lines(tmp_path, monkeypatch):
    with pytest.raises(KVBenchError, match="task.cot and task.no_context cannot both be true"):
        task(cot=True, no_context=True)
    with pytest.raises(KVBenchError, match=r"task.difficulty=\['medium'\] must list some of: easy, hard"):
        task(difficulty=["medium"])
    with pytest.raises(KVBenchError, match="task.max_prompt_tokens=1 must be >= 2"):
        task(max_prompt_tokens=1)
    with pytest.raises(KVBenchError, match="has no setting subsets"):
        task(subsets=["x"])
    bad = write_rows(tmp_path, [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "choice_C"}])
    with pytest.raises(KVBenchError, match=rf"^{bad}:2: the field\(s\) choice_C are missing or not text; re-download"):
        task(data_path=bad).samples()
    bad = write_rows(tmp_path, [{**ROWS[0], "answer": "E"}])
    with pytest.raises(KVBenchError, match=rf"^{bad}:1: answer='E' is not one of A, B, C, D; re-download"):
        task(data_path=bad).samples()
    bad = write_rows(tmp_path, [{**ROWS[0], "length": "huge"}])
    with pytest.raises(KVBenchError, match="length='huge' is not one of short, medium, long"):
        task(data_path=bad).samples()
    (tmp_path / "broken.jsonl").write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(KVBenchError, match=r"broken.jsonl:2: not valid JSON"):
        task(data_path=str(tmp_path / "broken.jsonl")).samples()
    with pytest.raises(KVBenchError, match=r"_id repeats"):
        task(data_path=write_rows(tmp_path, [ROWS[0], ROWS[0]])).samples()
    with pytest.raises(KVBenchError, match=r"does not exist; write it online with `HF_HUB_OFFLINE=0 python -c .*"
                                           r"load_dataset\('THUDM/LongBench-v2', split='train'\).to_json\("):
        task(data_path=str(tmp_path / "none.jsonl")).samples()
    with pytest.raises(KVBenchError, match="give a .json, .jsonl or .parquet file"):
        task(data_path=str(tmp_path / "x.csv")).samples()
    with pytest.raises(KVBenchError, match="no row matches"):
        task(domain=["Long In-context Learning"], difficulty=["easy"]).samples()

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KVBenchError) as err:
        build({"name": "longbench_v2"}).samples()
    assert str(err.value) == (f"THUDM/LongBench-v2 (split train) is not in the datasets cache and HF_HUB_OFFLINE=1: "
                              f"run `{fetch_command()}` once online, or set task.data_path to a local .json/.jsonl/.parquet "
                              "in its schema")


def test_hub_rows_through_datasets(monkeypatch):
    import datasets

    seen = []
    monkeypatch.setattr(datasets, "load_dataset", lambda hub, split: seen.append((hub, split)) or ROWS[:2])
    samples = build({"name": "longbench_v2"}).samples()
    assert seen == [("THUDM/LongBench-v2", "train")] and [s["id"] for s in samples] == [r["_id"] for r in ROWS[:2]]


# ----------------------------------------------------------------------------- end to end


def run_task(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from kvbench.resources import CONFIG_DIR
    from kvbench.runner.run import execute

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", f"paths.results={tmp_path}", "task=longbench_v2",
                                           f"task.data_path={DATA}", "task.max_prompt_tokens=100", *overrides])
    return execute(cfg)


@pytest.mark.slow
def test_end_to_end_through_the_tiny_model(tmp_path):
    folder = run_task(tmp_path, "method=snapkv", "budget.tokens=48", "task.max_new_tokens=4", "task.limit=3")
    scores = json.loads((folder / "scores.json").read_text())
    assert list(scores["scores"]) == ["overall", "easy", "hard", "short", "medium", "long"] and scores["n"] == 3
    assert set(scores["intervals"]) == set(scores["scores"]) and scores["intervals"]["overall"]["n_units"] == 3
    records = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(r["_id"] for r in ROWS[:3])
    assert all(r["truncated"] and r["n_new"] <= 4 and r["score"] in (0.0, 1.0) for r in records)
    assert scores["scores"]["overall"] == round(100 * sum(r["score"] for r in records) / 3, 1)


@pytest.mark.slow
def test_chain_of_thought_batched_equals_one_at_a_time(tmp_path):
    """cot: the CoT passes decode together (run.batch_size), each answer pass alone; the same tokens either way."""
    runs = [run_task(tmp_path / str(size), "task.cot=true", "task.limit=2", "task.max_new_tokens=3",
                     "task.cot_max_new_tokens=6", f"run.batch_size={size}") for size in (1, 2)]
    records = [sorted((json.loads(x) for x in (f / "predictions.jsonl").read_text().splitlines()), key=lambda r: r["id"])
               for f in runs]
    keep = ("id", "prediction", "response_cot", "pred", "n_prompt", "n_new")
    assert [[{k: r[k] for k in keep} for r in rs] for rs in records][0] == [[{k: r[k] for k in keep} for r in rs]
                                                                            for rs in records][1]
    assert all(r["task"] == "longbench_v2_cot" and "n_new" in r["answer_pass"] for r in records[0])


def test_config_composes_to_the_task():
    from hydra import compose, initialize_config_dir

    from kvbench.resources import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["task=longbench_v2"]).task
    built = build({k: v for k, v in cfg.items()})
    assert (built.cot, built.no_context, built.hub_id, built.split, built.temperature) == \
        (False, False, "THUDM/LongBench-v2", "train", 0.0)
