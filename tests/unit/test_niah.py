"""Needle in a haystack (issue 24): KVCache-Factory's context building, depth grid and scores, against explicit
transcriptions of run_needle_in_haystack.py / visualize.py; the grid in scores.json and the heatmaps written."""

import json

import numpy as np
import pytest
import yaml
from transformers import AutoTokenizer

from kvbench.engine import Budget, install
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.models.families import tiny_model
from kvbench.models.generator import Generator
from kvbench.report.heatmaps import niah_runs, write_heatmaps
from kvbench.resources import ASSETS_DIR
from kvbench.tasks.niah import ANSWER, NEEDLE, Niah, depth_grid, rouge1_f, word_recall


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS_DIR / "byte_tokenizer")


def reference_context(tokenizer, haystack: str, length: int, depth: float, buffer: int = 200) -> str:
    """run_needle_in_haystack.py's generate_context, step by step (period tokens: encode('.'))."""
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    dec = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    context = ""
    while len(enc(context)) < length:
        context += haystack
    tokens = enc(context)
    if len(tokens) > length:
        context = dec(tokens[:length])
    tokens_needle, tokens_context = enc(NEEDLE), enc(context)
    length -= buffer
    if len(tokens_context) + len(tokens_needle) > length:
        tokens_context = tokens_context[: length - len(tokens_needle)]
    if depth == 100:
        return dec(tokens_context + tokens_needle)
    insertion = int(len(tokens_context) * (depth / 100))
    new = tokens_context[:insertion]
    while new and new[-1] not in enc("."):
        insertion -= 1
        new = tokens_context[:insertion]
    return dec(new + tokens_needle + tokens_context[insertion:])


@pytest.mark.parametrize("intervals", [1, 6, 10, 35])
def test_depths_are_the_reference_linspace(intervals):
    expected = [0] if intervals == 1 else np.round(np.linspace(0, 100, intervals)).astype(int).tolist()
    assert depth_grid(intervals) == expected


@pytest.mark.parametrize("length,depth", [(500, 0), (500, 33), (700, 50), (700, 89), (900, 100)])
def test_context_as_the_reference_builds_it(tokenizer, length, depth):
    task = Niah(lengths=[500, 700, 900], haystack="grammar")
    haystack = task.text()
    assert task.context(tokenizer, length, depth) == reference_context(tokenizer, haystack, length, depth)
    context = task.context(tokenizer, length, depth)
    assert len(tokenizer.encode(context, add_special_tokens=False)) == length - 200
    at = context.index(NEEDLE)
    assert depth in (0, 100) or context[at - 1] == "."  # after a period (0: the start, 100: the end)
    assert depth != 100 or context.endswith(NEEDLE)


def test_scores_as_the_reference():
    assert word_recall("Eat a sandwich and sit in Dolores Park on a sunny day.", ANSWER) == 1.0
    assert word_recall("eat a sandwich", ANSWER) == pytest.approx(3 / 11)  # 11 words: 'a' counted once
    assert word_recall("sit in dolores park on a sunny day", ANSWER) == pytest.approx(7 / 11)  # 'day' is not 'day.'
    assert word_recall("", ANSWER) == 0.0
    assert rouge1_f(NEEDLE, "") == 0.0
    assert rouge1_f(NEEDLE, NEEDLE.strip()) == pytest.approx(10.0)


def test_grid_scores_and_heatmaps(tokenizer, tmp_path):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    install(model)
    task = Niah(lengths=[260, 300], depth_intervals=3, haystack="grammar", max_new_tokens=3)
    generator = Generator(model, tokenizer, build({"name": "snapkv", "window": 8, "query": "agnostic"}), Budget(tokens=32))
    samples = task.samples(tokenizer)
    assert [s["id"] for s in samples] == ["niah-260-0", "niah-260-50", "niah-260-100", "niah-300-0", "niah-300-50",
                                          "niah-300-100"]
    records = [task.evaluate(s, generator) for s in samples]
    assert all(0 <= r["score"] <= 1 and r["n_new"] <= 3 for r in records)
    grid = task.score_details(records)["grid"]
    assert set(grid) == {"260", "300"} and set(grid["260"]) == {"0", "50", "100"}
    for method, budget in [("full", "full"), ("snapkv", "32")]:  # two finished runs on disk
        folder = tmp_path / "runs" / "tiny" / "niah" / method / budget
        folder.mkdir(parents=True)
        (folder / "scores.json").write_text(json.dumps({"model": "tiny", "task": "niah", "method": method,
                                                        "budget": budget, "scores": task.score(records), "grid": grid}))
        (folder / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method}}))
    runs = niah_runs(sorted((tmp_path / "runs").glob("*/*/*/*")))
    assert [r["full"] for r in runs] == [True, False]
    written = write_heatmaps(runs, tmp_path / "plots" / "niah")
    assert sorted(p.name for p in written) == ["tiny_niah_full_full.png", "tiny_niah_methods.png",
                                               "tiny_niah_snapkv_32.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_bad_settings_name_the_fix():
    with pytest.raises(KVBenchError, match="task.buffer"):
        Niah(lengths=[100])
    with pytest.raises(KVBenchError, match="percents"):
        Niah(depths=[120])
    with pytest.raises(KVBenchError, match="folder of .txt"):
        Niah(haystack="no/such/folder").text()
