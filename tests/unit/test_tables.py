"""Tables (one per task family, blanks, n, settings of same-labelled runs) and plots (one colour per
method over every panel, reference lines, numeric order, ratio budgets), read back from the files."""


import pandas as pd
import pytest

from kvbench.report.runs import collect, find_runs
from kvbench.report.tables import build_tables, main, natural_key, pivot
from tests.helpers import fake_run


def test_one_table_per_family_read_back(tmp_path):
    fake_run(tmp_path, "tiny", "passkey", "full", "full", {"passkey": 100.0}, n=20)
    fake_run(tmp_path, "tiny", "passkey", "h2o", "tokens64", {"passkey": 80.0}, 64, n=20)
    fake_run(tmp_path, "tiny", "multikey", "h2o", "tokens64", {"multikey": 60.0}, 64, n=10)
    fake_run(tmp_path, "tiny", "passkey", "h2o", "tokens128", {"passkey": 90.0}, 128, n=20)
    for window in (128, 32, 64):
        fake_run(tmp_path, "tiny", f"ppl_synthetic_w{window}", "h2o", "tokens16",
                 {f"ppl_synthetic_w{window}": 10.0 + window / 100}, 16, n=2)
    fake_run(tmp_path, "tiny", "longbench", "full", "full", {"hotpotqa": 12.5, "trec": 40.0}, n=4)
    tables = build_tables(tmp_path, "all")
    assert set(tables) == {"retrieval", "ppl", "longbench"}
    for family, (_, paths) in tables.items():
        assert paths["md"] == tmp_path / "tables" / f"all_{family}.md"
        assert "nan" not in paths["md"].read_text().lower()
        assert "\\begin{tabular}" in paths["tex"].read_text()

    retrieval = pd.read_csv(tmp_path / "tables" / "all_retrieval.csv")
    assert list(retrieval.columns) == ["model", "method", "budget", "multikey", "passkey", "Avg", "n"]
    assert retrieval[["method", "budget"]].values.tolist() == [["full", "full"], ["h2o", "tokens64"],
                                                               ["h2o", "tokens128"]]
    h2o64 = retrieval.iloc[1]
    assert h2o64["Avg"] == 70.0 and h2o64["n"] == "10-20"  # both runs of the row; their counts differ
    assert pd.isna(retrieval.iloc[0]["multikey"]) and pd.isna(retrieval.iloc[0]["Avg"])  # incomplete row: no Avg
    assert str(retrieval.iloc[0]["n"]) == "20"
    md = (tmp_path / "tables" / "all_retrieval.md").read_text().splitlines()
    assert md[2].replace(" ", "").startswith("|tiny|full|full||100.00||")  # a blank cell, not nan

    ppl = pd.read_csv(tmp_path / "tables" / "all_ppl.csv")  # never an average over perplexities
    assert list(ppl.columns) == ["model", "method", "budget", "ppl_synthetic_w32", "ppl_synthetic_w64",
                                 "ppl_synthetic_w128", "n"]
    longbench = pd.read_csv(tmp_path / "tables" / "all_longbench.csv")
    assert longbench.loc[0, "Avg"] == 26.25 and longbench.loc[0, "n"] == 4


def test_same_labels_get_a_settings_column(tmp_path):
    """Two passkey runs labelled tiny/passkey/full/full with other depths: a settings column tells them apart;
    the multikey run with the first depth shares the first one's row."""
    fake_run(tmp_path, "tiny", "passkey", "full", "full", {"passkey": 100.0}, folder_name="full-aaaa",
             task_cfg={"depth_max": 0.5})
    fake_run(tmp_path, "tiny", "passkey", "full", "full", {"passkey": 75.0}, folder_name="full-bbbb",
             task_cfg={"depth_max": 1.0})
    fake_run(tmp_path, "tiny", "multikey", "full", "full", {"multikey": 50.0}, task_cfg={"depth_max": 0.5,
                                                                                        "num_keys": 4})
    fake_run(tmp_path, "tiny", "passkey", "h2o", "tokens64", {"passkey": 10.0}, 64)
    table = pivot(collect(find_runs(tmp_path)))
    assert table.index.names == ["model", "method", "budget", "settings"]
    assert list(table.index) == [("tiny", "full", "full", "task.depth_max=0.5"),
                                 ("tiny", "full", "full", "task.depth_max=1.0"), ("tiny", "h2o", "tokens64", "")]
    assert table.loc[("tiny", "full", "full", "task.depth_max=0.5"), "multikey"] == 50.0
    assert table.loc[("tiny", "full", "full", "task.depth_max=1.0"), "passkey"] == 75.0


def test_filters_and_cli(tmp_path, capsys):
    assert main(["--results", str(tmp_path)]) == 0
    assert "no finished runs" in capsys.readouterr().err
    fake_run(tmp_path, "tiny", "passkey", "full", "full", {"passkey": 100.0})
    fake_run(tmp_path, "other", "passkey", "full", "full", {"passkey": 50.0})
    assert main(["--results", str(tmp_path), "--name", "x", "--model", "other"]) == 0
    out = capsys.readouterr().out
    assert "## retrieval" in out and "other" in out and "| tiny" not in out
    assert pd.read_csv(tmp_path / "tables" / "x_retrieval.csv")["model"].tolist() == ["other"]


def test_natural_order():
    assert sorted(["w128", "w32", "w64"], key=natural_key) == ["w32", "w64", "w128"]


# ----------------------------------------------------------------------------- plots


def _lines_by_label(fig):
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            out.setdefault(line.get_label(), []).append((ax.get_title(), line))
    return out


def test_plot_one_colour_per_method_reference_lines_and_numeric_panels(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex

    from kvbench.report.plots import budget_vs_score, budget_vs_score_figure

    for window in (128, 32, 64):  # created out of order: panels must still read w32, w64, w128
        task = f"ppl_synthetic_w{window}"
        methods = ["snapkv", "headkv-r", "h2o"] if window == 32 else ["h2o", "snapkv", "headkv-r"]
        for method in methods:  # each panel meets the methods in another order
            for tokens in (16, 32):
                fake_run(tmp_path, "tiny", task, method, f"tokens{tokens}", {task: window + tokens + len(method)}, tokens)
        fake_run(tmp_path, "tiny", task, "full-qa6", "full", {task: 5.0}, method_name="full")
    long = collect(find_runs(tmp_path))
    fig = budget_vs_score_figure(long, title="t")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["ppl_synthetic_w32", "ppl_synthetic_w64", "ppl_synthetic_w128"]
    for ax in panels:  # the lines drawn a few points apart still set the axes' limits
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        for line in ax.get_lines():
            assert all(y0 < y < y1 for y in line.get_ydata())
            if line.get_xdata()[0] != 0:  # not a reference line (axes coordinates)
                assert all(x0 < x < x1 for x in line.get_xdata())
    lines = _lines_by_label(fig)
    for method in ("h2o", "snapkv", "headkv-r"):
        assert len(lines[method]) == 3  # one line per panel
        assert len({to_hex(line.get_color()) for _, line in lines[method]}) == 1  # one colour in every panel
        for _, line in lines[method]:
            assert list(line.get_xdata()) == [16.0, 32.0]
    assert len({to_hex(lines[m][0][1].get_color()) for m in ("h2o", "snapkv", "headkv-r")}) == 3
    for _, line in lines["full-qa6"]:  # the tagged full cache: a horizontal reference line, not a method
        assert list(line.get_xdata()) == [0, 1] and list(line.get_ydata()) == [5.0, 5.0]
        assert line.get_linestyle() == "--"
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert sorted(labels) == sorted(["full-qa6", "h2o", "snapkv", "headkv-r"])  # one entry each
    for handle, label in zip(legend.legend_handles, labels):
        if label != "full-qa6":
            assert to_hex(handle.get_color()) == to_hex(lines[label][0][1].get_color())
    out = budget_vs_score(long, tmp_path / "plots" / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_ratio_budgets(tmp_path):
    pytest.importorskip("matplotlib")
    from kvbench.report.plots import budget_vs_score_figure

    for ratio in (0.5, 0.25):
        fake_run(tmp_path, "tiny", "longbench", "vatp", f"ratio{ratio}", {"trec": ratio * 100}, ratio=ratio, kept=ratio * 400)
    fig = budget_vs_score_figure(collect(find_runs(tmp_path)))
    assert fig.axes[0].get_xlabel() == "KV budget (fraction of the prompt)"
    assert list(_lines_by_label(fig)["vatp"][0][1].get_xdata()) == [0.25, 0.5]
    fake_run(tmp_path, "tiny", "longbench", "snapkv", "tokens64", {"trec": 20.0}, 64, kept=60)
    fig = budget_vs_score_figure(collect(find_runs(tmp_path)))  # tokens and ratios: the prompt tokens kept
    assert fig.axes[0].get_xlabel() == "prompt tokens kept per head (mean, meta.json)"
    lines = _lines_by_label(fig)
    assert list(lines["vatp"][0][1].get_xdata()) == [100.0, 200.0] and list(lines["snapkv"][0][1].get_xdata()) == [60]


def test_an_ad_hoc_sweep_table_is_named_after_its_sweep(tmp_path, capsys):
    from omegaconf import OmegaConf

    from kvbench.report.sweep import SweepTableCallback

    runs = [fake_run(tmp_path, "tiny", "passkey", "full", "full", {"passkey": 100.0}),
            fake_run(tmp_path, "tiny", "passkey", "h2o", "tokens64", {"passkey": 50.0}, 64)]
    for stamp, listed in (("03-04-05", runs), ("03-09-00", runs[:1])):
        sweep = tmp_path / "multirun" / "2026-01-02" / stamp
        sweep.mkdir(parents=True)
        (sweep / "runs.txt").write_text("".join(f"{r}\n" for r in listed))
        SweepTableCallback(str(tmp_path), None).on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    first = pd.read_csv(tmp_path / "tables" / "sweep-2026-01-02-03-04-05_retrieval.csv")
    second = pd.read_csv(tmp_path / "tables" / "sweep-2026-01-02-03-09-00_retrieval.csv")
    assert len(first) == 2 and len(second) == 1  # the second sweep did not overwrite the first's table
    assert "sweep-2026-01-02-03-04-05_retrieval.md" in capsys.readouterr().out


def test_newest_picks_the_run_whose_scores_were_written_last(tmp_path):
    import os

    from kvbench.report.runs import newest

    old = fake_run(tmp_path, "tiny", "passkey", "h2o", "tokens64", {"passkey": 10.0}, 64, folder_name="tokens64-b")
    new = fake_run(tmp_path, "tiny", "passkey", "h2o", "tokens64", {"passkey": 90.0}, 64, folder_name="tokens64-a")
    os.utime(old / "scores.json", (1_000, 1_000))  # "b" sorts last but was written first
    rows = newest(collect([old, new]))
    assert set(rows["run"]) == {str(new)} and rows["score"].tolist() == [90.0]


def test_kvbench_report_writes_tables_and_the_plot(tmp_path, capsys):
    from kvbench.cli import main as kvbench_main

    fake_run(tmp_path, "tiny", "passkey", "full", "full", {"passkey": 100.0})
    fake_run(tmp_path, "tiny", "passkey", "h2o", "tokens64", {"passkey": 50.0}, 64)
    assert kvbench_main(["report", "--results", str(tmp_path), "--name", "mine"]) == 0
    assert (tmp_path / "tables" / "mine_retrieval.md").exists()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "plots" / "mine_budget_vs_score.png").exists()


def test_plot_styles_are_the_methods_own_in_every_figure_and_the_legend_sits_outside(tmp_path):
    pytest.importorskip("matplotlib")
    from kvbench.report.plots import budget_vs_score_figure, method_styles

    alone = method_styles(["snapkv"])["snapkv"]
    crowd = method_styles(["h2o", "snapkv", "tova", "knorm", "my-tagged-run"])
    assert crowd["snapkv"] == alone  # the same method looks the same whatever else is drawn
    assert len({(st["marker"], st["linestyle"], str(st["color"])) for st in crowd.values()}) == len(crowd)
    for method in ("h2o", "snapkv"):  # equal scores at equal budgets: drawn apart, never on top of each other
        fake_run(tmp_path, "tiny", "passkey", method, "tokens64", {"passkey": 50.0}, 64)
    fig = budget_vs_score_figure(collect(find_runs(tmp_path)))
    fig.canvas.draw()
    ax, legend = fig.axes[0], fig.legends[0]
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # right of the axes, not over the curves
    points = [line.get_transform().transform(line.get_xydata())[0] for line in ax.get_lines() if line.get_label() in
              ("h2o", "snapkv")]
    assert abs(points[0][0] - points[1][0]) > 1  # pixels apart


def test_reasoning_rows_show_the_kv_held_and_longbench_v2_has_no_avg():
    """kv_meta's per-head end/peak reach the reasoning table; LongBench v2's overlapping columns get no Avg and
    its run's number is `overall`."""
    import pandas as pd

    from kvbench.report.tables import pivot
    from kvbench.runner.provenance import kv_meta
    from kvbench.runner.scoring import average
    from kvbench.tasks.longbench_v2 import LongBenchV2

    records = [{"kv_kept_per_layer_head": [[4, 4], [4, 4]], "kv_end_kept_tokens": 40, "kv_peak_tokens": 80,
                "kv_kept_tokens": 16, "kv_full_tokens": 32}, {"kv_kept_per_layer_head": [[4, 4], [4, 4]],
                "kv_end_kept_tokens": 20, "kv_peak_tokens": 40, "kv_kept_tokens": 16, "kv_full_tokens": 32}]
    kv = kv_meta(records)
    assert (kv["kv_end_tokens_per_head"], kv["kv_peak_tokens_per_head"]) == (7.5, 15.0)  # (10 + 5) / 2, (20 + 10) / 2
    row = {"model": "m", "task": "math500", "method": "h2o", "budget": "tokens512", "n": 2, "reference": False,
           "settings": "", "kv_end": 7.5, "kv_peak": 15.0}
    long = pd.DataFrame([{**row, "subtask": "math500", "score": 50.0, "family": "reasoning"}])
    assert pivot(long).iloc[0][["math500", "KV end", "KV peak"]].tolist() == [50.0, 7.5, 15.0]
    v2 = pd.DataFrame([{**row, "subtask": s, "score": 40.0, "family": "longbench_v2"} for s in ("overall", "easy")])
    assert "Avg" not in pivot(v2).columns
    assert average(LongBenchV2, {"overall": 31.0, "easy": 50.0, "hard": 20.0}) == 31.0
