"""Perplexity protocols against ordinary forward passes; batching; data loading; end to end."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kvbench.engine import Budget
from kvbench.engine.attention import install
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.tasks import build as build_task
from kvbench.tasks.perplexity import load_documents, sliding_nll, sliding_windows, stream_nll


def docs_ids(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 260, (batch, n), generator=g)


def forward_nll(model, ids):
    """NLL of tokens 1.. from one ordinary forward pass (plain sdpa, no kvbench cache)."""
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            logits = model(ids).logits.float()
    finally:
        install(model, "sdpa")
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


def test_full_cache_stream_equals_one_forward_pass(tiny_gqa):
    model, _ = tiny_gqa
    ids = docs_ids(1, 120)
    streamed = stream_nll(model, build({"name": "full"}), None, ids)
    reference = forward_nll(model, ids)
    torch.testing.assert_close(streamed, reference, rtol=1e-4, atol=1e-5)
    assert math.exp(streamed.mean()) == pytest.approx(math.exp(reference.mean()), rel=1e-4)


def test_full_cache_sliding_equals_windowed_forward_passes(tiny_gqa):
    model, _ = tiny_gqa
    ids = docs_ids(1, 150, seed=1)
    window = 64
    slid = sliding_nll(model, build({"name": "full"}), None, ids, window)
    expected = torch.empty_like(slid)
    for begin, end, first in sliding_windows(150, window):
        chunk = forward_nll(model, ids[:, begin:end])  # entry k: token begin + k + 1
        expected[:, first - 1 : end - 1] = chunk[:, first - begin - 1 :]
    torch.testing.assert_close(slid, expected, rtol=1e-4, atol=1e-5)


def test_sliding_windows_score_every_token_once():
    for n, window in [(150, 64), (64, 64), (10, 64), (1000, 256), (257, 256)]:
        scored = []
        for begin, end, first in sliding_windows(n, window):
            assert end - begin <= window and first > begin
            scored += list(range(first, end))
        assert scored == list(range(1, n))


@pytest.mark.parametrize("method", [{"name": "weightedkv"}, {"name": "streamingllm", "positions": "shifted"}, {"name": "h2o"}])
def test_batched_streams_equal_one_at_a_time(tiny_gqa, method):
    model, _ = tiny_gqa
    ids = docs_ids(3, 80, seed=2)
    m = build({**method, "stage": "decode"})
    together = stream_nll(model, m, Budget(tokens=24), ids)
    alone = torch.cat([stream_nll(model, m, Budget(tokens=24), ids[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_compression_changes_the_stream(tiny_gqa):
    model, _ = tiny_gqa
    ids = docs_ids(1, 100, seed=3)
    full = stream_nll(model, build({"name": "full"}), None, ids)
    cut = stream_nll(model, build({"name": "weightedkv"}), Budget(tokens=16), ids)
    torch.testing.assert_close(full[:, :15], cut[:, :15])  # identical until the cache is first over budget
    assert not torch.allclose(full[:, 20:], cut[:, 20:])


def test_documents_load_from_local_files(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(5)))
    assert load_documents(str(tmp_path / "d.jsonl"), None, "test", "body") == [f"doc {i}" for i in range(5)]
    import pandas as pd

    pd.DataFrame({"text": ["a", "b"]}).to_parquet(tmp_path / "d.parquet")
    assert load_documents(str(tmp_path / "d.parquet"), None, "test", "text") == ["a", "b"]
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "1.txt").write_text("one")
    (tmp_path / "books" / "2.txt").write_text("two")
    assert load_documents(str(tmp_path / "books"), None, "test", "text") == ["one", "two"]
    with pytest.raises(KVBenchError, match="does not exist"):
        load_documents(str(tmp_path / "missing.jsonl"), None, "test", "text")


def test_seeded_sampling_and_truncation(tmp_path, tiny_gqa):
    _, tok = tiny_gqa
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(30)))
    cfg = {"name": "perplexity", "dataset": "mine", "source": str(tmp_path / "d.jsonl"), "num_samples": 5, "num_tokens": 50}
    a, b = build_task(cfg).samples(tok), build_task(cfg).samples(tok)
    assert [s["id"] for s in a] == [s["id"] for s in b] and len(a) == 5
    assert all(len(s["input_ids"]) == 50 for s in a)
    assert build_task({**cfg, "seed": 1}).samples(tok) != a
    assert build_task({**cfg, "protocol": "sliding", "window": 8192}).label == "ppl_mine_w8192"
    with pytest.raises(KVBenchError, match="no default source"):
        build_task({"name": "perplexity", "dataset": "mine"})


def test_snapkv_has_no_stream(tiny_gqa):
    from kvbench.models.generator import Generator

    model, tok = tiny_gqa
    task = build_task({"name": "perplexity", "dataset": "x", "source": "unused.txt"})
    gen = Generator(model, tok, build({"name": "snapkv"}), Budget(tokens=16))
    with pytest.raises(KVBenchError, match="perplexity compresses after every token"):
        task.evaluate({"id": "x", "doc_index": 0, "input_ids": [1, 5, 6, 7]}, gen)


@pytest.mark.slow
def test_end_to_end_batched_run_and_table(tmp_path):
    from hydra import compose, initialize_config_dir

    from kvbench.report.tables import build_tables
    from kvbench.resources import CONFIG_DIR
    from kvbench.runner.run import execute

    (tmp_path / "books.jsonl").write_text("\n".join(json.dumps({"text": f"Chapter {i}. " + "the river runs on " * 30}) for i in range(4)))
    overrides = ["logger=none", f"paths.results={tmp_path}", "task=ppl_pg19", f"task.source={tmp_path / 'books.jsonl'}",
                 "task.num_tokens=96", "task.batch_size=2"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        folder = execute(compose("config", overrides=[*overrides, "method=weightedkv", "budget.tokens=32"]))
        full = execute(compose("config", overrides=[*overrides, "method=full"]))
    # your own text under task=ppl_pg19 is filed under its own name (books), never as pg19
    assert folder.parts[-3:-1] == ("ppl_books", "weightedkv") and folder.name.startswith("tokens32-")
    scores = json.loads((folder / "scores.json").read_text())
    records = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["batch"] == 2 and len(r["nll"]) == 95 for r in records)
    pooled = math.exp(sum(r["nll_sum"] for r in records) / sum(r["n_tokens"] for r in records))
    assert scores["scores"]["ppl_books"] == pytest.approx(pooled, rel=1e-4)
    assert set(scores["per_document_ppl"]) == {r["id"] for r in records}
    curve = scores["nll_by_position"]  # the pooled PPL is exp of the count-weighted mean of the buckets
    mean = sum(m * c for m, c in zip(curve["mean_nll"], curve["count"])) / sum(curve["count"])
    assert sum(curve["count"]) == 4 * 95 and math.exp(mean) == pytest.approx(pooled, rel=1e-3)
    table, _ = build_tables(tmp_path, "ppl")["ppl"]
    assert list(table.columns) == ["ppl_books", "n"] and len(table) == 2  # no Avg over perplexities
    assert full.name.startswith("full-")


def test_synthetic_source_is_seeded_grammar_text(tiny_gqa):
    _, tok = tiny_gqa
    task = build_task({"name": "perplexity", "dataset": "synthetic", "num_samples": 3, "num_tokens": 64})
    a, b = task.samples(tok), task.samples(tok)
    assert a == b and len(a) == 3 and all(len(s["input_ids"]) == 64 for s in a)
    text = tok.decode(a[0]["input_ids"], skip_special_tokens=True)
    assert not any(ch.isdigit() for ch in text) and text.count(".") >= 3  # filler sentences, no keys


def test_nll_by_position_buckets_average_over_documents():
    from kvbench.tasks.perplexity import nll_by_position

    out = nll_by_position([[1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 4.0, 5.0]], buckets=2)
    assert out["width"] == 3 and out["start"] == [1, 4]
    assert out["mean_nll"] == [3.0, 4.5] and out["count"] == [6, 2]  # (1+2+3+3+4+5)/6, (4+5)/2
    assert nll_by_position([]) == {"width": 1, "start": [], "mean_nll": [], "count": []}
