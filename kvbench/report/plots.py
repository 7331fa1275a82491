"""Plots from run folders (matplotlib, the `plots` extra). Reads only results/, writes PNGs.

    python -m kvbench.report.plots --name demo        # results/plots/demo_budget_vs_score.png from every run

One colour and one legend entry per method over the whole figure; a full cache (any tag) is a
horizontal reference line, not a method; panels and budgets in numeric order (w32, w64, w128).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from kvbench.report.runs import collect, find_runs
from kvbench.report.tables import natural_key

REFERENCE_STYLES = ("--", ":", "-.")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series_label(row) -> str:
    """What a line is called: its method label, and the settings that tell it from a same-named run."""
    return f"{row['method']} [{row['settings']}]" if row.get("settings") else str(row["method"])


def method_colours(labels) -> dict[str, tuple]:
    """A fixed colour per label (sorted), the same in every panel of a figure."""
    plt = _plt()
    labels = sorted(set(labels), key=natural_key)
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def x_axis(compressed: pd.DataFrame) -> tuple[str, str]:
    """(column, axis label): the budget in tokens, else the ratio, else the prompt tokens kept (meta.json)."""
    if compressed["budget_tokens"].notna().all():
        return "budget_tokens", "KV budget (tokens per head)"
    if compressed["budget_ratio"].notna().all():
        return "budget_ratio", "KV budget (fraction of the prompt)"
    return "kept_per_head", "prompt tokens kept per head (mean, meta.json)"


def budget_vs_score_figure(long: pd.DataFrame, title: str = ""):
    """The matplotlib figure: one panel per (model, sub-task), a line per method, full cache as reference lines."""
    if long.empty:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D

    long = long.assign(series=long.apply(series_label, axis=1))
    refs, compressed = long[long["reference"]], long[~long["reference"]]
    x, xlabel = x_axis(compressed) if not compressed.empty else ("budget_tokens", "KV budget (tokens per head)")
    colours = method_colours(compressed["series"])
    ref_styles = {s: REFERENCE_STYLES[i % 3] for i, s in enumerate(sorted(set(refs["series"]), key=natural_key))}
    several_models = long["model"].nunique() > 1
    panels = list(dict.fromkeys(zip(long["family"], long["subtask"], long["model"])))  # LongBench: the papers' order
    panels = [(m, s) for f, s, m in sorted(panels, key=lambda p: (p[0], natural_key(p[1]) if p[0] == "ppl" else (), p[2]))]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (model, subtask) in zip(axes[0], panels):
        panel = long[(long["model"] == model) & (long["subtask"] == subtask)]
        for series, group in panel[panel["reference"]].groupby("series"):
            for value in group["score"]:
                ax.axhline(value, color="black", linestyle=ref_styles[series], linewidth=1, label=series)
        for series, group in panel[~panel["reference"]].groupby("series"):
            group = group[group[x].notna()].sort_values(x)
            ax.plot(group[x].astype(float), group["score"], marker="o", color=colours[series], label=series)
        if x == "budget_tokens" or x == "kept_per_head":
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (lower is better)" if str(subtask).startswith("ppl_") else "score")
        ax.set_title(f"{model} / {subtask}" if several_models else str(subtask), fontsize=9)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color="black", linestyle=style, label=s) for s, style in ref_styles.items()]
    handles += [Line2D([], [], color=colour, marker="o", label=s) for s, colour in colours.items()]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    return fig


def budget_vs_score(long: pd.DataFrame, out: str | Path, title: str = "") -> Path | None:
    """`budget_vs_score_figure` saved as a PNG; None when there is nothing to draw or no matplotlib."""
    try:
        fig = budget_vs_score_figure(long, title)
    except ImportError:
        return None
    if fig is None:
        return None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    _plt().close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Budget-vs-score plot from kvbench run folders.")
    parser.add_argument("--results", default="results")
    parser.add_argument("--name", default="all")
    args = parser.parse_args(argv)
    out = budget_vs_score(collect(find_runs(args.results)), Path(args.results) / "plots" / f"{args.name}_budget_vs_score.png")
    print(f"wrote {out}" if out else "nothing plotted (no runs, or matplotlib missing: pip install -e '.[plots]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
