import json

import pandas as pd
import yaml

from kvbench.tables import build_table, main, pivot


def fake_run(root, model, task, method, budget, scores, tokens=None):
    folder = root / "runs" / model / task / method / budget
    folder.mkdir(parents=True)
    labels = {"model": model, "task": task, "method": method, "budget": budget}
    (folder / "scores.json").write_text(json.dumps({**labels, "scores": scores, "n": 3}))
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"name": model}, "budget": {"tokens": tokens}}))
    return folder


def test_rows_are_ordered_and_average_is_the_row_mean(tmp_path):
    fake_run(tmp_path, "tiny", "lb", "streamingllm", "tokens128", {"a": 10.0, "b": 20.0}, 128)
    fake_run(tmp_path, "tiny", "lb", "streamingllm", "tokens32", {"a": 1.0, "b": 2.0}, 32)
    fake_run(tmp_path, "tiny", "lb", "full", "full", {"a": 50.0, "b": 61.0})
    fake_run(tmp_path, "tiny", "lb", "h2o", "ratio0.5", {"a": 30.0, "b": 40.0})
    table, paths = build_table(tmp_path, "t")
    assert list(table.index) == [
        ("tiny", "full", "full"),
        ("tiny", "h2o", "ratio0.5"),
        ("tiny", "streamingllm", "tokens32"),
        ("tiny", "streamingllm", "tokens128"),
    ]
    assert list(table.columns) == ["a", "b", "Avg"]
    assert table.loc[("tiny", "full", "full"), "Avg"] == 55.5
    assert paths["md"].read_text().startswith("| model")
    csv = pd.read_csv(paths["csv"])
    assert list(csv.columns) == ["model", "method", "budget", "a", "b", "Avg"]
    assert "\\begin{tabular}" in paths["tex"].read_text()


def test_subtask_order_and_filters(tmp_path):
    fake_run(tmp_path, "tiny", "lb", "full", "full", {"zeta": 1.0, "alpha": 2.0})
    fake_run(tmp_path, "other", "lb", "full", "full", {"zeta": 3.0, "alpha": 4.0})
    table, _ = build_table(tmp_path, "f", model=["other"])
    assert list(table.index) == [("other", "full", "full")]
    from kvbench.tables import collect, find_runs

    ordered = pivot(collect(find_runs(tmp_path)), subtask_order=["zeta", "alpha"])
    assert list(ordered.columns) == ["zeta", "alpha", "Avg"]


def test_cli_on_empty_and_full_folders(tmp_path, capsys):
    assert main(["--results", str(tmp_path)]) == 0
    assert "no finished runs" in capsys.readouterr().err
    fake_run(tmp_path, "tiny", "passkey", "full", "full", {"passkey": 100.0})
    assert main(["--results", str(tmp_path), "--name", "x"]) == 0
    assert (tmp_path / "tables" / "x.md").exists()


def test_budget_vs_score_plot(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    from kvbench.plots import budget_vs_score
    from kvbench.tables import collect, find_runs

    fake_run(tmp_path, "tiny", "passkey", "full", "full", {"passkey": 100.0})
    fake_run(tmp_path, "tiny", "passkey", "h2o", "tokens64", {"passkey": 80.0}, 64)
    fake_run(tmp_path, "tiny", "passkey", "h2o", "tokens192", {"passkey": 95.0}, 192)
    fake_run(tmp_path, "tiny", "ppl", "h2o", "tokens64", {"ppl_synthetic": 3.2}, 64)
    out = budget_vs_score(collect(find_runs(tmp_path)), tmp_path / "plots" / "p.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
